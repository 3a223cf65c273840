"""`python -m backend audit verify | export | replay | diff-projections`.

`audit verify --export FILE` reads only the file: it needs no DATABASE_URL and starts no embedded
server. Every other subcommand connects like the rest of the CLI (DATABASE_URL, else the embedded
server). Exit status: 0 clean, 1 breaks or differences found, 2 could not check (bad input, no database).
Reports go to stdout (JSON with --json), progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from backend.config import env_help

if TYPE_CHECKING:
    import asyncpg

    from backend.audit.verify import Report
    from backend.config import Settings

OK, FOUND, FAILED = 0, 1, 2


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser("audit", help="verify hash chains, export the log, replay a stream, diff projections",
                                  epilog=env_help())
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="recompute every hash chain and report each break",
                                 epilog=env_help() + " (none of them with --export, which reads only the file)")
    verify.add_argument("--stream", help="verify only this stream")
    verify.add_argument("--export", type=Path, metavar="FILE",
                        help="verify an NDJSON export file instead of the database (no database needed; - for stdin)")
    verify.add_argument("--partial", action="store_true",
                        help="the export starts mid-log (made with --after): anchor each stream at its first event")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--quiet", action="store_true", help="no progress on stderr")

    export = commands.add_parser("export", help="write the log (or a position range) as NDJSON with every hash",
                                 epilog=env_help())
    export.add_argument("--after", type=non_negative, default=0, metavar="P", help="start after position P")
    export.add_argument("--to", type=non_negative, metavar="P", help="stop at position P (default: the head now)")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to FILE (default: stdout)")
    export.add_argument("--quiet", action="store_true", help="no progress on stderr")

    replay = commands.add_parser("replay", help="print a stream's events, each followed by the state after it",
                                 epilog=env_help())
    replay.add_argument("--stream", required=True, help="e.g. wallet-<uuid>")
    replay.add_argument("--to-position", type=non_negative, metavar="P", help="stop after position P")
    replay.add_argument("--json", action="store_true", help="one JSON object per event: {event, state}")

    diff = commands.add_parser("diff-projections",
                               help="rebuild every read model from the log into scratch tables, compare with the live",
                               epilog=env_help())
    diff.add_argument("--json", action="store_true", help="print the differences as JSON")
    diff.add_argument("--quiet", action="store_true", help="no progress on stderr")


def non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def run(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.export import ExportFormatError
    from backend.audit.replay import ReplayError
    from backend.db import DatabaseUnavailable

    handlers = {"verify": verify, "export": export, "replay": replay, "diff-projections": diff_projections}
    try:
        return asyncio.run(handlers[args.audit_command](settings, args))
    except (DatabaseUnavailable, ExportFormatError, ReplayError, OSError) as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return FAILED


@asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """One connection to DATABASE_URL (or the embedded server), jsonb decoded like the app's pool."""
    import asyncpg

    from backend.app import database_dsn
    from backend.db import DatabaseUnavailable, connect_kwargs, describe, init_connection, mask_dsn
    from backend.store.migrate import require_migrated

    async with database_dsn(settings) as dsn:
        try:
            conn = await asyncpg.connect(dsn, **connect_kwargs(settings))
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise DatabaseUnavailable(f"cannot connect to database {mask_dsn(dsn)}: {describe(exc)}") from None
        try:
            await init_connection(conn)
            await require_migrated(conn, mask_dsn(dsn))
            yield conn
        finally:
            await conn.close()


def say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- verify


async def verify(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.export import read_export
    from backend.audit.verify import Report, head, verify, verify_database

    def progress(report: Report) -> None:
        done = f"{report.events_checked:,}" + (f"/{total:,}" if total else "")
        say(args, f"verified {done} events, {report.streams_checked:,} streams, "
                  f"{report.events_per_s:,.0f} events/s, {report.break_count} break(s)")

    total = 0
    if args.export is not None:
        report = Report(source="export", stream=args.stream, partial=args.partial)
        with open_input(args.export) as file:
            await verify(read_export(file, args.stream), report, contiguous=args.stream is None, progress=progress)
    else:
        async with connection(settings) as conn:
            total = 0 if args.stream else await head(conn)
            report = await verify_database(conn, args.stream, progress=progress)
    print_report(report, args.json)
    return OK if report.ok else FOUND


def open_input(path: Path) -> IO[bytes]:
    return os.fdopen(os.dup(sys.stdin.fileno()), "rb") if str(path) == "-" else path.open("rb")


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return
    what = f"stream {report.stream}" if report.stream else "the whole log"
    where = f" (positions {report.first_position}..{report.last_position})" if report.events_checked else ""
    print(f"{report.source}: {what}{where}{' [partial export]' if report.partial else ''}")
    print(f"streams checked: {report.streams_checked:,}")
    print(f"events checked:  {report.events_checked:,} in {report.elapsed_s:.2f} s ({report.events_per_s:,.0f}/s)")
    print(f"breaks:          {report.break_count}" + (" (first shown)" if report.break_count > len(report.breaks)
                                                       else ""))
    for found in report.breaks:
        print(f"  {found.kind}: stream {found.stream_id} version {found.version} position {found.position}"
              f" expected {found.expected} found {found.found}")
    print("OK: every hash chain verifies" if report.ok else "FAILED: the log does not match its hash chains")


# ---------------------------------------------------------------- export


async def export(settings: Settings, args: argparse.Namespace) -> int:
    """Write to FILE.partial and rename at the end, so an interrupted export never looks complete."""
    from backend.audit.export import export_pages
    from backend.audit.verify import head

    async with connection(settings) as conn:
        to = args.to if args.to is not None else await head(conn)
        say(args, f"exporting positions {args.after + 1}..{to}")
        if args.out is None:
            count = await write_pages(export_pages(conn, args.after, to), sys.stdout.buffer, args, to)
        else:
            partial = args.out.with_name(args.out.name + ".partial")
            with partial.open("wb") as out:
                count = await write_pages(export_pages(conn, args.after, to), out, args, to)
            partial.replace(args.out)
    say(args, f"exported {count:,} events (positions {args.after + 1}..{to})")
    return OK


async def write_pages(pages: AsyncIterator[bytes], out: IO[bytes], args: argparse.Namespace, to: int) -> int:
    count = 0
    async for chunk in pages:
        out.write(chunk)
        count += chunk.count(b"\n")
        if count % 100_000 < chunk.count(b"\n"):
            say(args, f"exported {count:,} events of up to {to - args.after:,}")
    out.flush()
    return count


# ---------------------------------------------------------------- replay


async def replay(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.replay import replay_stream

    async with connection(settings) as conn:
        steps = 0
        async for step in replay_stream(conn, args.stream, args.to_position):
            steps += 1
            if args.json:
                sys.stdout.buffer.write(orjson.dumps({"event": step.event, "state": step.state}) + b"\n")
            else:
                print_step(step.event, step.state)
        if steps == 0:
            print(f"tally: error: stream {args.stream!r} has no events"
                  + (f" up to position {args.to_position}" if args.to_position is not None else ""), file=sys.stderr)
            return FAILED
    return OK


def print_step(event: dict[str, Any], state: dict[str, Any] | None) -> None:
    data = orjson.dumps(event["data"], option=orjson.OPT_SORT_KEYS).decode()
    print(f"v{event['version']}  position {event['position']}  {event['recorded_at']}  {event['type']}  {data}")
    if state is not None:
        print(f"    state: {orjson.dumps(state, default=str).decode()}")


# ---------------------------------------------------------------- diff-projections


async def diff_projections(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.projections_diff import diff_all

    async with connection(settings) as conn:
        report = await diff_all(conn, progress=lambda text: say(args, text))
    if args.json:
        body = {"ok": report.ok, "errors": report.errors,
                "tables": [{"projection": t.projection, "table": t.table, "position": t.position,
                            "only_live": t.only_live, "only_rebuilt": t.only_rebuilt,
                            "rows": [r.as_dict() for r in t.rows]} for t in report.tables]}
        sys.stdout.buffer.write(orjson.dumps(body, default=str, option=orjson.OPT_INDENT_2) + b"\n")
        return OK if report.ok else FOUND
    for table in report.tables:
        print(table.describe() if table.count else f"{table.projection}.{table.table} at position "
              f"{table.position}: identical")
    for name, error in report.errors.items():
        print(f"{name}: {error}")
    differences = sum(t.count for t in report.tables)
    print(f"{differences} differing row(s) in {len(report.differences)} table(s), {len(report.errors)} error(s)")
    return OK if report.ok else FOUND
