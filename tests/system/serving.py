"""A real `python -m backend serve` process for system tests, its logs captured to files."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT
from tests.support import eventually_blocking


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_key(database_url: str, scopes: str = "admin", owner: str = "operator") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "backend", "keys", "create", "--owner", owner, "--scopes", scopes],
        cwd=ROOT, env={**os.environ, "DATABASE_URL": database_url}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("token:"))


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def started(database_url: str | None, *args: str, **env: str) -> Iterator[Server]:
    """`python -m backend serve *args` on a free port, its output captured to files; killed on the way out
    if it still runs. database_url None: DATABASE_URL and TEST_DATABASE_URL unset (the embedded server)."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL")}
    if database_url is not None:
        base["DATABASE_URL"] = database_url
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backend", "serve", *args], cwd=ROOT,
                env={**base, "PORT": str(port), **env}, stdout=stdout, stderr=stderr,
            )
        server = Server(proc, port, out, err)
        try:
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def serving(database_url: str, **env: str) -> Iterator[Server]:
    with started(database_url, **env) as server:
        wait_until_ready(server)
        yield server


@contextlib.contextmanager
def serving_workers(database_url: str, workers: int = 2, **env: str) -> Iterator[Server]:
    """`serve --workers N`, ready and with all N workers listening; on the way out (the body having
    passed) SIGTERM must end it with status 0."""
    with started(database_url, "--workers", str(workers), LOG_FORMAT="text", **env) as server:
        wait_until_ready(server)
        wait_for_workers(server, workers)
        yield server
        assert server.stop(timeout=60) == 0, server.logs()


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for_workers(server: Server, workers: int, timeout: float = 30.0) -> None:
    """Until the parent has `workers` children and each has said it listens (the parent exiting fails)."""
    def listening() -> bool:
        assert server.proc.poll() is None, server.logs()
        return len(children(server.proc.pid)) == workers and server.logs().count("listening on") == workers

    eventually_blocking(listening, timeout=timeout, what=lambda: f"{workers} workers listening: " + server.logs())


def answers_ready(base: str) -> bool:
    """Whether the server at base answers /health/ready with 200 (no answer yet: False)."""
    try:
        with urllib.request.urlopen(f"{base}/health/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def wait_until_ready(server: Server) -> None:
    def ready() -> bool:
        up = answers_ready(server.base)
        assert server.proc.poll() is None, server.logs()
        return up

    eventually_blocking(ready, what=lambda: "server ready: " + server.logs())
