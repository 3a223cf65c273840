"""Command line: `python -m backend serve | migrate | keys (create | revoke)`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime

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

    keys = commands.add_parser("keys", help="create or revoke API keys (bootstraps the first admin key)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print its token, once")
    create.add_argument("--owner", required=True, help="the owner whose wallets the key acts on")
    create.add_argument("--scopes", required=True, type=scope_list, metavar="SCOPE[,SCOPE...]",
                        help="comma separated, e.g. admin or wallets:read,wallets:write")
    create.add_argument("--name", default="created by the command line", help="a label for people")
    create.add_argument("--expires-at", type=aware_time, metavar="TIME",
                        help="RFC 3339 time with an offset, e.g. 2030-01-01T00:00:00Z (default: never)")
    revoke = key_commands.add_parser("revoke", help="revoke a key; every process rejects it within a second")
    revoke.add_argument("key_id", type=uuid.UUID, metavar="KEY_ID")

    from projections import cli as projections_cli

    projections_cli.add_subcommands(commands)

    from backend.audit import cli as audit_cli

    audit_cli.add_subcommands(commands)
    return parser


def scope_list(value: str) -> list[str]:
    from backend.domain import SCOPES

    scopes = [scope.strip() for scope in value.split(",") if scope.strip()]
    unknown = sorted(set(scopes) - SCOPES)
    if not scopes or unknown:
        raise argparse.ArgumentTypeError(f"unknown scopes {unknown}; choose from {', '.join(sorted(SCOPES))}")
    return scopes


def aware_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {value!r}") from None
    if parsed.utcoffset() is None:
        raise argparse.ArgumentTypeError("give the time with an offset, e.g. 2030-01-01T00:00:00Z")
    return parsed


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
    from backend.event_loop import loop_name
    from backend.gc_tuning import tune_for_serving
    from backend.http.accept import BatchAcceptSite
    from backend.http.access_log import AccessLogger

    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log_class=AccessLogger,
        shutdown_timeout=settings.shutdown_timeout_s,
    )
    try:
        await runner.setup()
        site = BatchAcceptSite(runner, settings.host, settings.port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    tune_for_serving()
    for address in runner.addresses:
        host, port = address[0], address[1]
        log.info(f"listening on http://{host}:{port}",
                 extra={"url": f"http://{host}:{port}", "event_loop": loop_name()})
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


async def manage_keys(settings: Settings, args: argparse.Namespace) -> None:
    """Create or revoke a key straight through the Repository (no server needed, migrating first
    so that the very first admin key can be made on an empty database)."""
    from backend.app import database_dsn
    from backend.commands import api_keys
    from backend.commands.context import SYSTEM, CommandContext
    from backend.db import create_pool
    from backend.store.event_store import EventStore
    from backend.store.migrate import migrate
    from backend.store.repository import Repository

    async with database_dsn(settings) as dsn:
        pool = await create_pool(dsn, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2}))
        store = EventStore(pool)
        try:
            if settings.apply_migrations:
                async with pool.acquire() as conn:
                    await migrate(conn)
            repo = Repository(store)
            ctx = CommandContext(SYSTEM)
            if args.keys_command == "create":
                key_id, token = api_keys.new_token()
                decision = await api_keys.create_key(repo, ctx, key_id, token, args.owner, args.name, args.scopes,
                                                     args.expires_at)
            else:
                decision = await api_keys.revoke_key(repo, ctx, args.key_id)
            await repo.save(*decision.aggregates, metadata={**ctx.metadata(), "via": "cli"})
        finally:
            await store.close()
            await pool.close()
    if args.keys_command == "create":
        print(f"key_id: {key_id}")
        print(f"token: {token}")
        print("tally: store the token now, it is not shown again", file=sys.stderr)
    else:
        print(f"revoked {args.key_id}")


def run_keys(settings: Settings, args: argparse.Namespace) -> int:
    from backend.commands.errors import CommandError
    from backend.domain import DomainError

    try:
        asyncio.run(manage_keys(settings, args))
    except (DatabaseUnavailable, CommandError, DomainError) as exc:
        print(f"tally: error: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "keys":
        return run_keys(settings, args)
    if args.command == "projections":
        from projections import cli as projections_cli

        return projections_cli.run(settings, args)
    if args.command == "audit":
        from backend.audit import cli as audit_cli

        return audit_cli.run(settings, args)
    from backend.audit.signing import SigningKeyError
    from backend.event_loop import run_main
    from backend.http.accept import CannotListen

    command = {"serve": serve, "migrate": run_migrations}[args.command]
    return run_main(command(settings), settings.event_loop, "tally",
                    (DatabaseUnavailable, CannotListen, SigningKeyError))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
