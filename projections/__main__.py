"""`python -m projections`: a worker that runs every projection runner (and the expiry process manager)
outside `serve`, until SIGTERM or SIGINT. Run `serve` with RUN_PROJECTIONS=false to move the work here;
running both is safe too (each projection has one leader across all processes)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from backend.config import ConfigError, Settings, check_environment, load_settings
from backend.db import DatabaseUnavailable, connect_kwargs, create_pool
from backend.event_loop import loop_name, run_main
from backend.gc_tuning import tune_for_serving
from backend.logs import configure_logging

log = logging.getLogger("projections")


async def work(settings: Settings) -> None:
    from backend.commands.bus import CommandBus
    from backend.dsn import database_dsn
    from backend.store.event_store import EventStore
    from backend.store.listener import Listener
    from backend.store.migrate import migrate
    from backend.store.repository import Repository
    from backend.supervisor import Supervisor
    from projections.registry import all_projections
    from projections.service import ProjectionService, connector
    from projections.waiting import CheckpointWatcher

    async with database_dsn(settings) as dsn:
        pool = await create_pool(dsn, settings)
        store = EventStore(pool, max_batch_events=settings.append_batch_max_events)
        supervisor = Supervisor()  # runs and restarts the listener and the runners
        listener = Listener(dsn, poll_interval_s=settings.listener_poll_s, connect_kwargs=connect_kwargs(settings),
                            supervisor=supervisor)
        try:
            if settings.apply_migrations:
                async with pool.acquire() as conn:
                    await migrate(conn)
            await listener.start(timeout=settings.connect_timeout_s + 5)
            bus = CommandBus(Repository(store, snapshot_every=settings.snapshot_every))
            service = ProjectionService(
                all_projections(bus, expiry_batch_size=settings.expiry_batch_size),
                connector(dsn, settings, durable_commits=False), CheckpointWatcher(pool), settings, listener=listener,
                supervisor=supervisor,
            )
            await service.start()
            tune_for_serving()
            log.info("projection worker running",
                     extra={"projections": [r.name for r in service.runners], "event_loop": loop_name()})
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await stop.wait()
            log.info("projection worker stopping")
            await service.stop()
        finally:
            await listener.close()
            await supervisor.close()
            await store.close()
            await pool.close()


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m projections",
        description="Run every projection runner and the reservation-expiry process manager until SIGTERM "
                    "or SIGINT. Configured from the environment like `serve` (DATABASE_URL; unset: the "
                    "embedded PostgreSQL under ./.data/). Status and rebuilds: `python -m backend projections`.",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    try:
        settings = load_settings()
        check_environment(settings, uses_database=True, serves=True)
    except ConfigError as exc:
        print(f"projections: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format_choice())
    return run_main(work(settings), settings.event_loop, "projections", (DatabaseUnavailable,))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
