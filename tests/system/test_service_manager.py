"""`serve`, the parent of `serve --workers 2` and `python -m projections` under a service manager: each
speaks systemd's sd_notify protocol to the NOTIFY_SOCKET a test binds (with SO_PASSCRED, so each
datagram names the process that sent it). READY=1 comes once the process answers /health/ready,
STOPPING=1 on SIGTERM from the process itself before it exits, WATCHDOG=1 pings when WATCHDOG_USEC is
set; with workers, only the parent speaks, and a worker whose pings stop is replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support import eventually_blocking
from tests.system.serving import Server, children, free_port, started

pytestmark = pytest.mark.system

CREDENTIALS = struct.Struct("iII")


@dataclass(frozen=True)
class Message:
    pid: int
    lines: tuple[str, ...]


class Manager:
    """The service manager's end of NOTIFY_SOCKET: every datagram, with its sender's pid."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.messages: list[Message] = []

    def read(self) -> list[Message]:
        """Every message so far (once the socket is closed, those read before)."""
        while self.sock.fileno() != -1:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS.size))
            except BlockingIOError:
                return self.messages
            pid = CREDENTIALS.unpack_from(ancillary[0][2])[0]
            self.messages.append(Message(pid, tuple(data.decode().split("\n"))))
        return self.messages

    def first(self, line: str, proc: subprocess.Popen[bytes], logs: Server | None = None,
              timeout: float = 60) -> Message:
        """The first message with `line` (waiting for it while `proc` runs)."""
        def found() -> Message | None:
            running = proc.poll() is None  # asked first: what an exited process sent is already queued
            message = next((m for m in self.read() if line in m.lines), None)
            if message is None:
                assert running, f"exited before {line}: " + (logs.logs() if logs else "")
            return message

        return eventually_blocking(found, timeout=timeout, interval=0.01,
                                   what=lambda: f"{line} in {self.heard()}\n" + (logs.logs() if logs else ""))

    def heard(self) -> list[Message]:
        """What came but the watchdog's pings (for failure messages)."""
        return [m for m in self.read() if m.lines != ("WATCHDOG=1",)]

    def lines(self, pid: int | None = None) -> list[str]:
        return [line for m in self.read() if pid is None or m.pid == pid for line in m.lines]


@contextmanager
def manager() -> Iterator[Manager]:
    """A datagram socket at an abstract address (as systemd's own '@...' addresses are)."""
    name = f"tally-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind("\0" + name)
        systemd = Manager(sock, "@" + name)
        try:
            yield systemd
        finally:
            systemd.read()  # what came last, before the socket closes


def ready_status(url: str) -> int:
    """GET url once, no retry: its status (a refused connection fails the test)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_serve_is_ready_when_it_answers_and_says_stopping_before_it_exits(fresh_database_url: str) -> None:
    with manager() as systemd, started(fresh_database_url, LOG_FORMAT="text", NOTIFY_SOCKET=systemd.address,
                                       WATCHDOG_USEC="400000") as server:
        ready = systemd.first("READY=1", server.proc, server)
        assert ready_status(f"{server.base}/health/ready") == 200  # at once: READY=1 follows the startup
        assert ready.pid == server.proc.pid
        assert f"STATUS=serving on port {server.port}" in ready.lines
        assert "STATUS=starting: connecting to the database" in systemd.lines()
        eventually_blocking(lambda: systemd.lines().count("WATCHDOG=1") >= 3, what="three watchdog pings")
        server.proc.send_signal(signal.SIGTERM)
        stopping = systemd.first("STOPPING=1", server.proc, server, timeout=30)
        assert server.proc.wait(30) == 0, server.logs()
    assert stopping.pid == server.proc.pid  # sent by the process itself, so before it exited
    assert any(line.startswith("STATUS=draining") for line in stopping.lines)
    assert {m.pid for m in systemd.messages} == {server.proc.pid}
    order = [line for line in systemd.lines() if line in ("READY=1", "STOPPING=1")]
    assert order == ["READY=1", "STOPPING=1"]


def test_without_a_watchdog_serve_sends_no_pings(fresh_database_url: str) -> None:
    with manager() as systemd, started(fresh_database_url, LOG_FORMAT="text", NOTIFY_SOCKET=systemd.address,
                                       WATCHDOG_USEC="400000", WATCHDOG_PID="1") as server:
        systemd.first("READY=1", server.proc, server)
        assert server.stop() == 0
    assert "WATCHDOG=1" not in systemd.lines()  # WATCHDOG_PID names another process


def test_waiting_for_the_database_is_a_status_line() -> None:
    port = free_port()  # nothing listens there
    with manager() as systemd, started(f"postgresql://postgres@127.0.0.1:{port}/tally", LOG_FORMAT="text",
                                       NOTIFY_SOCKET=systemd.address, WAIT_FOR_DB_S="60") as server:
        def waiting() -> str | None:
            assert server.proc.poll() is None, server.logs()
            return next((line for line in systemd.lines() if line.startswith("STATUS=waiting for the database")),
                        None)

        found = eventually_blocking(waiting, what=lambda: f"a waiting status in {systemd.heard()}")
        assert "READY=1" not in systemd.lines()
    assert "refused" in found, found


def started_workers(parent: int) -> list[int]:
    """The parent's children that run a worker already (held between fork and exec, a child would
    hold the parent in Popen too)."""
    found = []
    for pid in children(parent):
        with contextlib.suppress(OSError):
            if b"\0--worker\0" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not the parent's --workers
                found.append(pid)
    return found


def test_only_the_parent_of_workers_speaks_and_only_once_every_worker_answers(own_database_url: str) -> None:
    metrics = free_port()
    # migrated beforehand: a worker held while it applied migrations would hold the other at their lock
    with manager() as systemd, started(own_database_url, "--workers", "2", LOG_FORMAT="text", APPLY_MIGRATIONS="false",
                                       METRICS_PORT=str(metrics), NOTIFY_SOCKET=systemd.address,
                                       WATCHDOG_USEC="1000000") as server:
        late = eventually_blocking(lambda: started_workers(server.proc.pid)[-1:], interval=0.005,
                                   what="a worker started")[0]
        os.kill(late, signal.SIGSTOP)  # held before it is ready
        try:
            systemd.first("STATUS=starting: 1 of 2 workers ready", server.proc, server)
            assert "READY=1" not in systemd.lines()
        finally:
            os.kill(late, signal.SIGCONT)
        ready = systemd.first("READY=1", server.proc, server)
        # each worker's own health port answers at once: READY=1 waited for both
        assert [ready_status(f"http://127.0.0.1:{metrics + i}/health/ready") for i in (0, 1)] == [200, 200]
        assert ready.pid == server.proc.pid
        assert f"STATUS=serving on port {server.port} with 2 workers" in ready.lines
        assert "STATUS=starting 2 workers" in systemd.lines()
        eventually_blocking(lambda: systemd.lines().count("WATCHDOG=1") >= 3, what="three watchdog pings")
        assert server.stop(timeout=60) == 0, server.logs()
    assert {m.pid for m in systemd.read()} == {server.proc.pid}  # no worker spoke to the manager
    assert systemd.lines().count("READY=1") == 1
    stopping = next(m for m in systemd.messages if "STOPPING=1" in m.lines)
    assert "STATUS=draining 2 workers" in stopping.lines


def test_a_worker_whose_watchdog_pings_stop_is_replaced(fresh_database_url: str) -> None:
    with manager() as systemd, started(fresh_database_url, "--workers", "2", LOG_FORMAT="text",
                                       NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1000000") as server:
        systemd.first("READY=1", server.proc, server)
        wedged = children(server.proc.pid)[0]
        os.kill(wedged, signal.SIGSTOP)  # its event loop no longer turns
        try:
            eventually_blocking(lambda: wedged not in children(server.proc.pid)
                                and len(children(server.proc.pid)) == 2,
                                what=lambda: "the wedged worker replaced: " + server.logs())
        finally:
            if os.path.exists(f"/proc/{wedged}"):
                os.kill(wedged, signal.SIGCONT)
        assert "stopped answering its watchdog" in server.logs()
        serving = f"STATUS=serving on port {server.port} with 2 workers"
        eventually_blocking(lambda: systemd.lines().count(serving) >= 2,
                            what=lambda: f"{serving} in {systemd.heard()}")
        assert server.stop(timeout=60) == 0, server.logs()


def test_the_projection_worker_says_ready_and_stopping(fresh_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_database_url, "LOG_FORMAT": "text"}
    with manager() as systemd:
        proc = subprocess.Popen([sys.executable, "-m", "projections"], cwd=ROOT,
                                env={**env, "NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "400000"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = systemd.first("READY=1", proc)
            assert any(line.startswith("STATUS=running") for line in ready.lines)
            eventually_blocking(lambda: systemd.lines().count("WATCHDOG=1") >= 3, what="three watchdog pings")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert {m.pid for m in systemd.read()} == {proc.pid}
    assert [line for line in systemd.lines() if line in ("READY=1", "STOPPING=1")] == ["READY=1", "STOPPING=1"]
