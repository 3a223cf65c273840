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
def serving(database_url: str, **env: str) -> Iterator[Server]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "backend", "serve"], cwd=ROOT,
                env={**os.environ, "DATABASE_URL": database_url, "PORT": str(port), **env},
                stdout=stdout, stderr=stderr,
            )
        server = Server(proc, port, out, err)
        try:
            wait_until_ready(server)
            yield server
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


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
