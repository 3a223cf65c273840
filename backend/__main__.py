"""Command line: `python -m backend serve | migrate | keys (create | revoke) | projections | audit | db roles`;
the last three are defined beside what they run (projections/cli.py, backend/audit/cli.py, backend/dbroles.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from backend.config import (
    ConfigError,
    OneLineErrors,
    Settings,
    cannot_write,
    check_environment,
    env_help,
    load_settings,
)
from backend.db import DatabaseUnavailable
from backend.logs import configure_logging
from backend.server.workers import WorkerPlace

log = logging.getLogger("backend")


def add_wait_for_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait-for-db", type=float, metavar="SECONDS",
                        help="retry the database with backoff for this long instead of failing at once")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="tally", description="Tally wallet and credit ledger")
    parser.add_argument("--version", action=VersionAction, help="print the version (and git commit) and exit")
    # every subcommand's parser is a OneLineErrors too (add_subparsers makes them of the parent's class)
    commands = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
                    parser.add_subparsers(dest="command", required=True))

    serve = commands.add_parser("serve", help="run the HTTP service",
                                epilog=env_help("HOST, PORT, every other setting in README.md's Configuration "
                                                "table"))
    serve.add_argument("--host", help="listen address (default: HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: PORT or 8080)")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="server processes on the one port (default: WORKERS or 1)")
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # index of one of --workers N
    serve.add_argument("--shared-limits", type=Path, help=argparse.SUPPRESS)  # the parent's limits table
    add_wait_for_db(serve)

    migrate = commands.add_parser("migrate", help="apply pending database migrations and exit",
                                  epilog=env_help() + ". Exit status 2: database unreachable; with --status, "
                                  "1: migrations pending or changed")
    add_wait_for_db(migrate)
    migrate.add_argument("--status", action="store_true",
                         help="show applied, pending and changed migrations; apply nothing")

    keys = commands.add_parser("keys", help="create or revoke API keys (bootstraps the first admin key)",
                               epilog=env_help("APPLY_MIGRATIONS"))
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print its token, once",
                                     epilog=env_help("APPLY_MIGRATIONS (true: apply pending migrations first)"))
    create.add_argument("--owner", required=True, help="the owner whose wallets the key acts on")
    create.add_argument("--scopes", required=True, type=scope_list, metavar="SCOPE[,SCOPE...]",
                        help="comma separated, e.g. admin or wallets:read,wallets:write")
    create.add_argument("--name", default="created by the command line", help="a label for people")
    create.add_argument("--expires-at", type=aware_time, metavar="TIME",
                        help="RFC 3339 time with an offset, e.g. 2030-01-01T00:00:00Z (default: never)")
    shown = create.add_mutually_exclusive_group()
    shown.add_argument("--token-only", action="store_true", help="print only the token, for KEY=$(...)")
    shown.add_argument("--json", action="store_true", help='print {"key_id": ..., "token": ...} on one line')
    revoke = key_commands.add_parser("revoke", help="revoke a key; every process rejects it within a second",
                                     epilog=env_help("APPLY_MIGRATIONS"))
    revoke.add_argument("key_id", type=uuid.UUID, metavar="KEY_ID")

    from projections import cli as projections_cli

    projections_cli.add_subcommands(commands)

    from backend.audit import cli as audit_cli

    audit_cli.add_subcommands(commands)

    from backend import dbroles

    dbroles.add_subcommands(commands)
    return parser


class VersionAction(argparse.Action):
    """`--version`: the installed distribution's version, plus the git commit when run from a checkout."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from backend.version import version_text

        print(f"tally {version_text()}")
        parser.exit()


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
    for option, field in (("host", "host"), ("port", "port"), ("wait_for_db", "wait_for_db_s"),
                            ("workers", "workers")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[field] = value
    return load_settings(**overrides)


async def serve(settings: Settings, worker: WorkerPlace | None = None) -> None:
    from aiohttp import web

    from backend.app import create_app
    from backend.event_loop import loop_name
    from backend.gc_tuning import tune_for_serving
    from backend.server.run import serve_app

    def listening(runner: web.AppRunner) -> None:
        tune_for_serving()
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info(f"listening on http://{host}:{port}",
                     extra={"url": f"http://{host}:{port}", "event_loop": loop_name()})

    await serve_app(create_app(settings, worker=worker), settings, listening, reuse_port=worker is not None)
    log.info("stopped")


async def run_migrations(settings: Settings, args: argparse.Namespace) -> int:
    from backend.db import create_pool
    from backend.dsn import database_dsn
    from backend.store.migrate import migrate, migration_status

    async with database_dsn(settings) as dsn:
        # the migration lock is a session's: on DIRECT_DATABASE_URL, never through a pooler
        one = {"pool_min_size": 1, "pool_max_size": 1, "database_pool_mode": "session"}
        pool = await create_pool(settings.direct_dsn(dsn), settings.model_copy(update=one), writable=not args.status)
        try:
            async with pool.acquire() as conn:
                if args.status:
                    found = await migration_status(conn)
                else:
                    applied = await migrate(conn)
        finally:
            await pool.close()
    if not args.status:
        print(f"applied {len(applied)} migration(s): {applied}" if applied else "database is up to date")
        return 0
    for version, name in found.applied:
        changed = any(m.version == version for m in found.changed)
        print(f"{version:04d}_{name}  {'CHANGED since applied' if changed else 'applied'}")
    for migration in found.pending:
        print(f"{migration.version:04d}_{migration.name}  pending")
    for version, name in found.unknown:
        print(f"{version:04d}_{name}  applied, unknown to this version of Tally")
    print(f"{len(found.applied)} applied, {len(found.pending)} pending, {len(found.changed)} changed"
          + ("" if found.up_to_date else "; run `python -m backend migrate`" if not found.changed else
             "; a changed migration needs a person: restore its file"))
    return 0 if found.up_to_date else 1


async def manage_keys(settings: Settings, args: argparse.Namespace) -> None:
    """Create or revoke a key straight through the Repository (no server needed, migrating first
    so that the very first admin key can be made on an empty database)."""
    from backend.bootstrap import open_core
    from backend.commands import api_keys
    from backend.commands.context import SYSTEM, CommandContext

    if args.keys_command == "create":  # the domain's rules first: a key it refuses migrates nothing
        api_keys.mint(args.owner, args.name, args.scopes, args.expires_at, datetime.now(UTC))  # thrown away
    small = settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2})
    async with open_core(small) as core:
        repo = core.repository
        ctx = CommandContext(SYSTEM, now=core.clock.now())
        if args.keys_command == "create":
            key_id, token = api_keys.new_token()
            decision = await api_keys.create_key(repo, ctx, key_id, token, args.owner, args.name, args.scopes,
                                                 args.expires_at)
        else:
            decision = await api_keys.revoke_key(repo, ctx, args.key_id)
        await repo.save(*decision.aggregates, metadata={**ctx.metadata(), "via": "cli"})
    if args.keys_command == "create":
        if args.token_only:
            print(token)
        elif args.json:
            print(json.dumps({"key_id": str(key_id), "token": token}))
        else:
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
    except (CommandError, DomainError) as exc:  # refused: bad input, as an unknown key or a bad owner is
        print(f"tally: error: {getattr(exc, 'detail', exc)}", file=sys.stderr)
        return 2
    return 0


def uses_database(args: argparse.Namespace) -> bool:
    """Every subcommand but the audit's offline ones (a key file, an export file, a server over HTTP)."""
    if args.command == "audit":
        from backend.audit import cli as audit_cli

        return audit_cli.uses_database(args)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        check_environment(settings, uses_database=uses_database(args), serves=args.command == "serve")
    except ConfigError as exc:
        print(f"tally: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format_choice())
    if args.command != "serve":
        return run_tool(settings, args)
    if settings.workers > 1 and args.worker is None:
        from backend.server.workers import run_workers

        return run_workers(settings)
    from backend.audit.signing import SigningKeyError
    from backend.event_loop import run_main
    from backend.server.site import CannotListen
    from backend.store.migrate import MigrationError

    worker = WorkerPlace(args.worker, args.shared_limits) if args.worker is not None else None
    return run_main(serve(settings, worker), settings.event_loop, "tally",
                    (DatabaseUnavailable, CannotListen, SigningKeyError, MigrationError))


def run_tool(settings: Settings, args: argparse.Namespace) -> int:
    """A one-shot subcommand. A database that cannot be reached, or lacks migrations a read needs, is
    one line on stderr and exit status 2, whichever subcommand met it."""
    import asyncpg

    from backend.store.migrate import MigrationError

    client_errors = (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
    try:
        if args.command == "keys":
            return run_keys(settings, args)
        if args.command == "projections":
            from projections import cli as projections_cli

            return projections_cli.run(settings, args)
        if args.command == "audit":
            from backend.audit import cli as audit_cli

            return audit_cli.run(settings, args)
        if args.command == "db":
            from backend import dbroles

            return dbroles.run(settings, args)
        return asyncio.run(run_migrations(settings, args))
    except (DatabaseUnavailable, MigrationError) as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
    except asyncpg.UndefinedTableError as exc:  # a table dropped by hand under a migrated schema
        print(f"tally: error: {exc}; is this Tally's database? `python -m backend migrate --status` "
              "shows its migrations", file=sys.stderr)
    except (OSError, asyncpg.PostgresError, *client_errors) as exc:  # unwritable output, a lost session, a refusal
        from backend.db import describe, is_unavailable

        if isinstance(exc, client_errors) and not is_unavailable(exc):
            raise  # asyncpg's client errors are a session lost under an operation, or else a bug
        where = "cannot write the output" if cannot_write(exc) else "database"
        print(f"tally: error: {where}: {describe(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    return 2


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
