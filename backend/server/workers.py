"""`serve --workers N`: a parent process that runs N server processes on one port.

One Python process serves on one core; several share a host's cores. Each worker is an ordinary
`python -m backend serve --worker` that binds its port with SO_REUSEPORT, so the kernel spreads new
connections over the workers. Correctness does not depend on which worker a request reaches: every
append is checked by the store, and projections and the Merkle folder elect one leader across
processes by advisory locks.

The parent imports no aiohttp and serves nothing. It refuses a signing key every worker would refuse
(AUDIT_SIGNING_KEY_FILE: they would be restarted forever), starts the embedded PostgreSQL once (when
DATABASE_URL is unset) and hands its address to the workers; restarts a worker that exits while not
asked to stop, with backoff; forwards SIGTERM and SIGINT to every worker (each drains as a lone
`serve` does) and waits up to SHUTDOWN_TIMEOUT_S plus a margin. Its exit status is 0 when every
worker exited 0. Workers run in their own session, so a Ctrl-C reaches them once, through the parent;
should the parent be killed outright, each worker gets SIGTERM from the kernel and drains.

Before starting them the parent creates the host's table of per-key limits (rate limit buckets, open
streams: backend/shared_limits.py) and tells each worker its index and the table's path on the
command line, so a key's limits hold for the host, not per worker; it removes the table when it exits
(one killed with SIGKILL cannot: the next parent on the host sweeps that table away).

Under a service manager (NOTIFY_SOCKET set: systemd's Type=notify) the parent alone speaks to it
(backend/service_manager.py): workers get a socket of the parent's as their NOTIFY_SOCKET instead
(backend/server/worker_notices.py), and the parent says READY=1 once every worker has said it is
listening, STATUS lines as workers start, die and come back, and STOPPING=1 on SIGTERM. With a watchdog
(WATCHDOG_USEC) the parent pings it from its loop, and holds each worker to the same interval: a worker
whose pings stop (its event loop wedged, or the process stopped) is killed and restarted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from backend import service_manager, shared_limits
from backend.config import Settings
from backend.event_loop import ignore_stray_signals
from backend.server.worker_notices import WorkerNotices

log = logging.getLogger("backend")

WORKER_FLAG = "--worker"
LIMITS_FLAG = "--shared-limits"
STOP_MARGIN_S = 5.0
"""Beyond SHUTDOWN_TIMEOUT_S: a worker's cleanup (pools, streams) after its drain."""
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
STEADY_S = 30.0
"""A worker that ran this long before it died is restarted after the shortest backoff again."""
POLL_S = 0.05
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerPlace:
    """What a worker is told of its place: its index among the N (0..N-1; a restarted worker takes its
    predecessor's) and the host's shared limits table (backend/shared_limits.py)."""

    index: int
    limits: Path | None


@dataclass(slots=True)
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    due: float = 0.0
    """When a dead worker is started again (monotonic)."""
    ready: bool = False
    """This run has said READY=1 (only known with notices)."""
    pinged: float = 0.0
    """When this run last pinged its watchdog, or started (monotonic)."""


class Supervisor:
    """Start, watch and stop the workers (one thread, polling: no event loop in the parent)."""

    def __init__(self, settings: Settings, env: dict[str, str], limits: Path,
                 notices: WorkerNotices | None = None, watchdog_s: float | None = None) -> None:
        self.settings = settings
        self.env = env
        self.limits = limits
        self.workers = [Worker(index) for index in range(settings.workers)]
        self.stop_signal: int | None = None
        self.orphaned = drain_when_orphaned(os.getpid())
        self.notices = notices
        self.watchdog_s = watchdog_s
        self.announced = False
        """Whether the service manager was told READY=1."""
        self.pinged = 0.0

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def start(self, worker: Worker) -> None:
        worker.proc = subprocess.Popen([sys.executable, "-m", "backend", "serve", WORKER_FLAG, str(worker.index),
                                        LIMITS_FLAG, str(self.limits)],
                                       env=self.env, start_new_session=True,
                                       preexec_fn=self.orphaned)  # noqa: PLW1509 (the parent runs no threads)
        worker.started = worker.pinged = time.monotonic()
        worker.ready = False
        log.info("worker started", extra={"worker": worker.index, "pid": worker.proc.pid})

    def watch(self) -> int:
        """Run until a stop signal; then stop every worker and give the exit status."""
        for worker in self.workers:
            self.start(worker)
        while self.stop_signal is None:
            self.tend()
            now = time.monotonic()
            for worker in self.workers:
                if worker.proc is None:
                    if now >= worker.due:
                        self.start(worker)
                    continue
                status = worker.proc.poll()
                if status is None:
                    continue
                if now - worker.started >= STEADY_S:
                    worker.failures = 0
                delay = min(BACKOFF_FIRST_S * 2 ** worker.failures, BACKOFF_MAX_S)
                worker.failures += 1
                worker.proc = None
                worker.ready = False
                worker.due = now + delay
                log.warning("worker exited; restarting it", extra={
                    "worker": worker.index, "status": status, "restart_in_s": delay})
                service_manager.status(f"worker {worker.index} exited with status {status}; "
                                       f"restarting it in {delay:g} s")
            time.sleep(POLL_S)
        return self.stop_all(self.stop_signal)

    def tend(self) -> None:
        """Read the workers' notices, tell the service manager what changed, ping its watchdog and
        kill a worker whose own pings stopped."""
        if self.notices is None:
            return
        now = time.monotonic()
        by_pid = {worker.proc.pid: worker for worker in self.workers if worker.proc is not None}
        for notice in self.notices.receive():
            worker = by_pid.get(notice.pid)
            if worker is None:
                continue
            if "WATCHDOG" in notice.fields or "READY" in notice.fields:
                worker.pinged = now
            if notice.fields.get("READY") == "1" and not worker.ready:
                worker.ready = True
                self.report_ready()
            elif "STATUS" in notice.fields and not worker.ready:
                service_manager.status(f"worker {worker.index}: {notice.fields['STATUS']}")
        if self.watchdog_s is None:
            return
        if now - self.pinged >= self.watchdog_s / 2:
            service_manager.notify("WATCHDOG=1")
            self.pinged = now
        if self.stop_signal is not None:
            return  # draining workers are killed at the deadline
        for worker in self.workers:  # held to the watchdog once ready, as systemd holds the parent
            if (worker.proc is not None and worker.ready and now - worker.pinged > self.watchdog_s
                    and worker.proc.poll() is None):
                log.error("worker stopped answering its watchdog; killing it",
                          extra={"worker": worker.index, "pid": worker.proc.pid, "watchdog_s": self.watchdog_s})
                worker.proc.kill()  # a wedged loop would not drain; SIGKILL reaches a stopped process too
                worker.pinged = now  # once: its exit restarts it

    def report_ready(self) -> None:
        waiting = sum(not worker.ready for worker in self.workers)
        if waiting:
            service_manager.status(f"starting: {len(self.workers) - waiting} of {len(self.workers)} workers ready")
            return
        text = f"serving on port {self.settings.port} with {len(self.workers)} workers"
        if not self.announced:
            self.announced = True
            log.info("all workers ready", extra={"workers": len(self.workers)})
            service_manager.ready(text)
        else:
            service_manager.status(text)

    def stop_all(self, signum: int) -> int:
        running = [worker.proc for worker in self.workers if worker.proc is not None]
        log.info("stopping workers", extra={"signal": signal.Signals(signum).name, "workers": len(running)})
        service_manager.stopping(f"draining {len(running)} workers")
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signum)
        deadline = time.monotonic() + self.settings.shutdown_timeout_s + STOP_MARGIN_S
        while time.monotonic() < deadline and any(proc.poll() is None for proc in running):
            self.tend()  # the manager's watchdog still wants its pings while the workers drain
            time.sleep(POLL_S)
        clean = True
        for proc in running:
            status = proc.poll()
            if status is None:
                log.error("worker did not stop in time; killing it", extra={"pid": proc.pid})
                proc.kill()
                status = proc.wait()
            if status != 0:
                log.warning("worker stopped with an error", extra={"pid": proc.pid, "status": status})
                clean = False
        log.info("stopped")
        return 0 if clean else 1


def drain_when_orphaned(parent: int) -> Callable[[], None] | None:
    """What a worker runs before `exec` so that it gets SIGTERM (and drains) should the parent die
    without forwarding one (kill -9): Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return None

    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork: the child only calls it

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def worker_env(settings: Settings, database_url: str | None, notices: WorkerNotices | None = None,
               watchdog_s: float | None = None) -> dict[str, str]:
    """The workers' environment: the parent's, with the command line's overrides and the database; the
    service manager's variables replaced by the parent's notice socket (and its watchdog interval)."""
    env = {name: value for name, value in os.environ.items() if name not in service_manager.MANAGER_VARIABLES}
    env.update({"HOST": settings.host, "PORT": str(settings.port), "WORKERS": str(settings.workers),
                "WAIT_FOR_DB_S": str(settings.wait_for_db_s)})
    if database_url is not None:
        env["DATABASE_URL"] = database_url
    if notices is not None:
        env[service_manager.NOTIFY_SOCKET] = notices.address
        if watchdog_s is not None:
            env[service_manager.WATCHDOG_USEC] = str(round(watchdog_s * 1_000_000))
    return env


def run_workers(settings: Settings) -> int:
    """The parent of `serve --workers N`: its exit status."""
    from backend.db import DatabaseUnavailable

    if settings.port == 0:
        print("tally: error: WORKERS > 1 needs a fixed PORT (with port 0 each worker would get its own)",
              file=sys.stderr)
        return 2
    if settings.audit_signing_key_file is not None:  # refused once here, not by every worker restarted forever
        from backend.audit.signing import Signer, SigningKeyError

        try:
            Signer.configured(settings.audit_signing_key_file)
        except SigningKeyError as exc:
            print(f"tally: error: {exc}", file=sys.stderr)
            return 1
    supervisor: Supervisor | None = None

    def stop_early(signum: int, frame: FrameType | None) -> None:
        if supervisor is not None:
            supervisor.request_stop(signum, frame)
        else:
            raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_early)
    ignore_stray_signals()  # SIGHUP would end the parent, and with it every worker
    embedded = None
    limits: Path | None = None
    notices: WorkerNotices | None = None
    try:
        database_url = None
        if settings.dsn() is None:
            service_manager.status("starting the embedded PostgreSQL")
            from backend.dsn import EMBEDDED_DATABASE
            from backend.embedded_pg import start_embedded

            embedded = start_embedded(settings.data_dir / "pg")
            from backend.db import ensure_database

            asyncio.run(ensure_database(embedded.dsn("postgres"), EMBEDDED_DATABASE))
            database_url = embedded.dsn(EMBEDDED_DATABASE)
        limits = shared_limits.create(settings.workers)
        if os.environ.get(service_manager.NOTIFY_SOCKET):
            notices = WorkerNotices()
        watchdog_s = service_manager.watchdog_interval_s()
        service_manager.status(f"starting {settings.workers} workers")
        supervisor = Supervisor(settings, worker_env(settings, database_url, notices, watchdog_s), limits,
                                notices, watchdog_s)
        return supervisor.watch()
    except DatabaseUnavailable as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if notices is not None:
            notices.close()
        if limits is not None:
            shared_limits.remove(limits)
        if embedded is not None:
            embedded.stop()
