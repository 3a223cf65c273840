"""Command line: `python -m backend serve | migrate`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from backend.config import ConfigError, Settings, load_settings
from backend.db import DatabaseUnavailable
from backend.logs import configure_logging

log = logging.getLogger("backend")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Tally wallet and credit ledger")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 8080)")
    serve.add_argument("--wait-for-db", type=float, metavar="SECONDS",
                       help="retry the database with backoff for this long instead of failing at once")

    migrate = commands.add_parser("migrate", help="apply pending database migrations and exit")
    migrate.add_argument("--wait-for-db", type=float, metavar="SECONDS")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    for option, field in (("host", "host"), ("port", "port"), ("wait_for_db", "wait_for_db_s")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return load_settings(**overrides)


async def serve(settings: Settings) -> None:
    from aiohttp import web

    from backend.app import create_app
    from backend.http.access_log import AccessLogger

    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.shutdown_timeout_s,
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info(f"listening on http://{host}:{port}", extra={"url": f"http://{host}:{port}"})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: draining requests")
    await runner.cleanup()
    log.info("stopped")


async def run_migrations(settings: Settings) -> None:
    from backend.app import database_dsn
    from backend.db import create_pool
    from backend.store.migrate import migrate

    async with database_dsn(settings) as dsn:
        pool = await create_pool(dsn, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}))
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await pool.close()
    print(f"applied {len(applied)} migration(s): {applied}" if applied else "database is up to date")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    command = {"serve": serve, "migrate": run_migrations}[args.command]
    try:
        asyncio.run(command(settings))
    except DatabaseUnavailable as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
