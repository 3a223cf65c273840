"""Helpers for tests that run `python -m backend serve` and `python -m projections` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO
from urllib.parse import quote, urlsplit, urlunsplit

from tests.conftest import ROOT
from tests.support import eventually_blocking
from tests.system.serving import answers_ready


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_user(dsn: str, user: str, password: str | None = None) -> str:
    """The same DSN, connecting as another role."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit((parts.scheme, f"{auth}@{host}", parts.path, parts.query, ""))


def run_backend(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def create_key(database_url: str, *, env: dict[str, str] | None = None) -> str:
    created = run_backend("keys", "create", "--owner", "operator", "--scopes", "admin",
                          env={"DATABASE_URL": database_url, **(env or {})})
    assert created.returncode == 0, created.stderr
    return next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("token:"))


@dataclass
class Process:
    """A child process whose stderr goes to a temporary file (a pipe nobody reads could fill and block it)."""

    name: str
    args: list[str]
    env: dict[str, str]
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] = field(default_factory=lambda: tempfile.TemporaryFile("a+b"))  # noqa: SIM115 (lives as long as the process; append: the child shares it)
    started_at: float = 0.0

    @classmethod
    def serve(cls, name: str, database_url: str, **env: str) -> Process:
        port = free_port()
        return cls(name, ["-m", "backend", "serve"], {"DATABASE_URL": database_url, "PORT": str(port),
                                                      "LOG_FORMAT": "text", **env}, port=port)

    @classmethod
    def projections(cls, name: str, database_url: str, **env: str) -> Process:
        return cls(name, ["-m", "projections"], {"DATABASE_URL": database_url, "LOG_FORMAT": "text", **env})

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Process:
        self.log.seek(0)
        self.log.truncate()
        self.proc = subprocess.Popen([sys.executable, *self.args], cwd=ROOT, env={**os.environ, **self.env},
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.started_at = time.monotonic()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.output()}"
            if self.port is None:
                return "projection worker running" in self.output()
            return answers_ready(self.base)

        eventually_blocking(ready, timeout=timeout, what=lambda: f"{self.name} ready:\n{self.output()}")

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status (killed after timeout: the assertion on the status then fails)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")
