"""A real PgBouncer (Debian's `pgbouncer`) in transaction mode in front of the test server, for the
tests that run Tally's pools through it. Its configuration lives in a temporary directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
SERVER_CONNECTIONS = 4
"""Server connections per database: fewer than a test app's pool (10), so transactions really are
multiplexed over whichever server connection is free, as in production."""

INI = """\
[databases]
* = host={host} port={port} user={user}{password}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
max_client_conn = 1000
server_round_robin = 0
server_reset_query =
logfile =
pidfile =
"""


@dataclass(frozen=True)
class Bouncer:
    port: int
    log: Path

    def dsn_for(self, direct: str) -> str:
        """The same database as `direct`, reached through this PgBouncer."""
        parts = urlsplit(direct)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit((parts.scheme, f"{user}127.0.0.1:{self.port}", parts.path, "", ""))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer did not listen on {port} within {timeout} s: {log.read_text()[-2000:]}")


def run_as(host: str) -> str:
    """PgBouncer refuses to run as root: as root, run it as the owner of the server's socket directory
    (the embedded server's user, who may reach the socket), else as nobody (TCP)."""
    if host.startswith("/"):
        return pwd.getpwuid(Path(host).stat().st_uid).pw_name
    return "nobody"


@contextlib.contextmanager
def running_pgbouncer(server_dsn: str, *, pool_size: int = SERVER_CONNECTIONS) -> Iterator[Bouncer]:
    """Start PgBouncer (pool_mode = transaction, auth_type = any: it logs in to the server as the DSN's
    user) for every database of the server behind server_dsn; stop it afterwards."""
    server = urlsplit(server_dsn)
    # the embedded server listens on a Unix socket named in the query (?host=/dir), PgBouncer takes the dir
    host = parse_qs(server.query).get("host", [server.hostname or "127.0.0.1"])[0]
    password = f" password={unquote(server.password)}" if server.password else ""
    directory = Path(tempfile.mkdtemp(prefix="tally-pgbouncer-"))
    directory.chmod(0o755)  # as root PgBouncer drops to another user (run_as), who must read the file
    port = free_port()
    ini = directory / "pgbouncer.ini"
    ini.write_text(INI.format(host=host, port=server.port or 5432,
                              user=unquote(server.username or "postgres"), password=password,
                              listen_port=port, pool_size=pool_size))
    ini.chmod(0o644)
    log = directory / "pgbouncer.log"
    command = [PGBOUNCER, *(["-u", run_as(host)] if os.geteuid() == 0 else []), str(ini)]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, process, log)
        yield Bouncer(port, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)
