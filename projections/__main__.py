"""`python -m projections`: a worker that runs every projection runner (and the expiry process manager)
outside `serve`, until SIGTERM or SIGINT. Run `serve` with RUN_PROJECTIONS=false to move the work here;
running both is safe too (each projection has one leader across all processes)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from backend import service_manager
from backend.config import ConfigError, OneLineErrors, Settings, check_environment, load_settings
from backend.db import DatabaseUnavailable
from backend.event_loop import loop_name, run_main
from backend.gc_tuning import tune_for_serving
from backend.logs import configure_logging
from backend.server.run import Serving
from backend.server.site import CannotListen
from backend.store.migrate import MigrationError

log = logging.getLogger("projections")


async def work(settings: Settings) -> None:
    """Run the projections; a service manager hears READY=1 once every runner has started, STOPPING=1 on
    SIGTERM, and watchdog pings throughout."""
    async with service_manager.watchdog():
        service_manager.status("starting: connecting to the database")
        await run_projections(settings)


async def run_projections(settings: Settings) -> None:
    from backend.bootstrap import open_core
    from backend.server.metrics_site import serve_worker_http, worker_app, worker_metrics
    from backend.server.run import until_stopped
    from projections.registry import all_projections
    from projections.service import ProjectionService, connector
    from projections.waiting import CheckpointWatcher

    async with open_core(settings) as core:  # its supervisor runs and restarts the listener and the runners
        service = ProjectionService(
            all_projections(core.bus, expiry_batch_size=settings.expiry_batch_size, clock=core.clock),
            connector(core.direct_dsn, settings, durable_commits=False), CheckpointWatcher(core.pool), settings,
            listener=core.listener, supervisor=core.supervisor, tail=core.tail,
        )
        http: Serving | None = None
        try:
            if settings.projections_metrics_port:  # first: a port that is taken fails before any work starts
                http = await serve_worker_http(
                    worker_app(settings, core.pool, worker_metrics(core.pool, core.store, core.listener,
                                                                   core.supervisor), core.supervisor), settings)
            await service.start()
            tune_for_serving()
            log.info("projection worker running",
                     extra={"projections": [r.name for r in service.runners], "event_loop": loop_name(),
                            "metrics_port": settings.projections_metrics_port or None})
            service_manager.ready(f"running {len(service.runners)} projection runners")
            await until_stopped()
            log.info("projection worker stopping")
            service_manager.stopping("stopping the projection runners")
            await service.stop()
        finally:
            if http is not None:
                await http.stop(settings.shutdown_timeout_s)


def port_number(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="python -m projections",
        description="Run every projection runner and the reservation-expiry process manager until SIGTERM "
                    "or SIGINT. Configured from the environment like `serve` (DATABASE_URL; unset: the "
                    "embedded PostgreSQL under ./.data/). Status and rebuilds: `python -m backend projections`.",
    )
    parser.add_argument("--port", type=port_number, default=None, metavar="PORT",
                        help="serve /metrics and /health/* on HOST:PORT (default: PROJECTIONS_METRICS_PORT, "
                             "whose default 0 serves nothing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.port is not None:
            settings = settings.model_copy(update={"projections_metrics_port": args.port})
        check_environment(settings, uses_database=True, serves=True)
    except ConfigError as exc:
        print(f"projections: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format_choice())
    return run_main(work(settings), settings.event_loop, "projections",
                    (DatabaseUnavailable, CannotListen, MigrationError))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
