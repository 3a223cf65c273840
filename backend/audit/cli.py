"""`python -m backend audit verify | export | replay | diff-projections | keygen | checkpoint | consistency`.

`audit verify --export FILE` reads only the file: it needs no DATABASE_URL and starts no embedded
server; nor do keygen, checkpoint and consistency (the last two ask a server over HTTP, with the API key
in TALLY_API_KEY or --key). Every other subcommand connects like the rest of the CLI (DATABASE_URL,
else the embedded server). Exit status: 0 clean, 1 breaks or differences found, 2 could not check (bad
input, no database, no server). Reports go to stdout (JSON with --json), progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from backend.config import cannot_write, env_help, int_between
from backend.store.events import MAX_POSITION, MAX_STREAM_ID_LENGTH

if TYPE_CHECKING:
    import aiohttp
    import asyncpg

    from backend.audit.verify import Report
    from backend.config import Settings
    from projections.leader import Connect

OK, FOUND, FAILED = 0, 1, 2

SERVER_ENV = ("TALLY_URL", "TALLY_API_KEY")
"""What checkpoint and consistency read to reach a server over HTTP (the --url and --key defaults)."""

HTTP_TIMEOUT_S = 60
"""Longest a request to the server (checkpoint, consistency, verify --url) may take."""

OFFLINE_SUBCOMMANDS = frozenset({"keygen", "checkpoint", "consistency"})
"""Subcommands that never connect to a database (nor start the embedded one): a key file, or a server
asked over HTTP. `verify --export` is the fourth, by its option."""


def uses_database(args: argparse.Namespace) -> bool:
    """Whether this audit subcommand connects to a database, so that production requires DATABASE_URL."""
    if args.audit_command in OFFLINE_SUBCOMMANDS:
        return False
    return not (args.audit_command == "verify" and args.export is not None)


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = subparsers.add_parser(
        "audit", help="verify hash chains and signed checkpoints, export the log, replay a stream, diff projections",
        epilog=env_help())
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="recompute every hash chain and report each break",
                                 epilog=env_help() + " (none of them with --export, which reads only the file)")
    verify.add_argument("--stream", type=stream_id, help="verify only this stream")
    verify.add_argument("--export", type=Path, metavar="FILE",
                        help="verify an NDJSON export file instead of the database (no database needed; - for stdin)")
    verify.add_argument("--partial", action="store_true",
                        help="the export starts mid-log (made with --after): anchor each stream at its first event")
    verify.add_argument("--checkpoint", type=Path, metavar="CP.json",
                        help="with --export: check the signature, then that the export's tree has the checkpoint's "
                             "root at its size")
    verify.add_argument("--public-key", type=Path, metavar="KEY",
                        help="the pinned public key (PEM or hex; default: the one in the checkpoint file)")
    verify.add_argument("--baseline", type=Path, metavar="OLD_EXPORT",
                        help="with --checkpoint: an export that matches the checkpoint (checked), to name the first "
                             "differing position offline")
    verify.add_argument("--url", help="with --checkpoint: on a mismatch, locate the first differing position "
                                      "with the server's inclusion proofs")
    verify.add_argument("--key", help="API key for --url (default: TALLY_API_KEY)")
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
    replay.add_argument("--stream", type=stream_id, required=True, help="e.g. wallet-<uuid>")
    replay.add_argument("--to-position", type=non_negative, metavar="P", help="stop after position P")
    replay.add_argument("--json", action="store_true", help="one JSON object per event: {event, state}")

    diff = commands.add_parser("diff-projections",
                               help="rebuild every read model from the log into scratch tables, compare with the live",
                               epilog=env_help())
    diff.add_argument("--json", action="store_true", help="print the differences as JSON")
    diff.add_argument("--quiet", action="store_true", help="no progress on stderr")

    keygen = commands.add_parser("keygen", help="write a new Ed25519 checkpoint signing key (PKCS#8 PEM, mode 0600)",
                                 epilog=env_help(database=False))
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="the key file (never overwritten)")

    checkpoint = commands.add_parser("checkpoint", help="fetch the latest signed checkpoint, verify it, save it",
                                     epilog=env_help(*SERVER_ENV, database=False))
    add_server_options(checkpoint)
    checkpoint.add_argument("--out", type=Path, required=True, metavar="FILE", help="write the checkpoint here")
    checkpoint.add_argument("--public-key", type=Path, metavar="KEY",
                            help="the pinned public key (default: fetched from the server and saved with it)")

    consistency = commands.add_parser("consistency", help="check with the server's proof that NEW extends OLD",
                                      epilog=env_help(*SERVER_ENV, database=False))
    consistency.add_argument("old", type=Path, metavar="OLD.json")
    consistency.add_argument("new", type=Path, metavar="NEW.json")
    add_server_options(consistency)
    consistency.add_argument("--public-key", type=Path, metavar="KEY",
                             help="the pinned public key (default: the one in the checkpoint files)")
    consistency.add_argument("--json", action="store_true", help="print the result as JSON")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("TALLY_URL", "http://127.0.0.1:8080"),
                        help="the Tally server (default: TALLY_URL or http://127.0.0.1:8080)")
    parser.add_argument("--key", help="API key with audit:read (default: TALLY_API_KEY)")


non_negative = int_between(0, MAX_POSITION)
"""A position: what the database cannot hold is bad input here, not a DataError from it."""


def stream_id(value: str) -> str:
    """A stream id as the store takes them (bytes that are not UTF-8 arrive as surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not valid UTF-8") from None
    if not 1 <= len(value) <= MAX_STREAM_ID_LENGTH:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_STREAM_ID_LENGTH} characters")
    return value


def run(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.auditor import AuditError
    from backend.audit.export import ExportFormatError
    from backend.audit.replay import ReplayError
    from backend.db import DatabaseUnavailable
    from backend.store.events import UnreadableEvent

    handlers = {"verify": verify, "export": export, "replay": replay, "diff-projections": diff_projections,
                "keygen": keygen, "checkpoint": checkpoint, "consistency": consistency}
    try:
        return asyncio.run(handlers[args.audit_command](settings, args))
    except TimeoutError:  # asyncpg's and aiohttp's say nothing: say what did not answer
        late = (f"the database did not answer within COMMAND_TIMEOUT_S ({settings.command_timeout_s:g} s)"
                if uses_database(args) else f"the server did not answer within {HTTP_TIMEOUT_S} s")
        print(f"tally: error: {late}", file=sys.stderr)
        return FAILED
    except (DatabaseUnavailable, ExportFormatError, ReplayError, UnreadableEvent, AuditError, OSError) as exc:
        print(f"tally: error: {'cannot write the output: ' if cannot_write(exc) else ''}{exc}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        return FAILED


@asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """One session of its own (see direct_sessions): repeatable-read reads, prepared statements."""
    async with direct_sessions(settings) as connect:
        conn = await connect("tally")
        try:
            yield conn
        finally:
            await conn.close()


@asynccontextmanager
async def direct_sessions(settings: Settings) -> AsyncIterator[Connect]:
    """Opens sessions of their own on DIRECT_DATABASE_URL (default DATABASE_URL, or the embedded server),
    jsonb decoded like the app's pool, each checked to be on a migrated database."""
    import asyncpg

    from backend.db import DatabaseUnavailable, describe, mask_dsn
    from backend.dsn import database_dsn
    from backend.store.migrate import require_migrated
    from projections.service import connector

    async with database_dsn(settings) as pooled:
        dsn = settings.direct_dsn(pooled)
        connect = connector(dsn, settings)

        async def session(application_name: str) -> asyncpg.Connection[asyncpg.Record]:
            try:
                conn = await connect(application_name)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                raise DatabaseUnavailable(f"cannot connect to database {mask_dsn(dsn)}: {describe(exc)}") from None
            try:
                await require_migrated(conn, mask_dsn(dsn))
            except BaseException:
                conn.terminate()
                raise
            return conn

        yield session


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
    if args.checkpoint is not None:
        if args.export is None or args.stream is not None or args.partial:
            print("tally: error: --checkpoint needs --export of the whole log (no --stream, no --partial)",
                  file=sys.stderr)
            return FAILED
        return await verify_against_checkpoint(args, progress)
    if args.export is not None:
        report = Report(source="export", stream=args.stream, partial=args.partial)
        with open_input(args.export) as file:
            await verify(read_export(file, args.stream), report, contiguous=args.stream is None, progress=progress)
    else:
        async with connection(settings) as conn:
            total = 0 if args.stream else await head(conn)
            report = await verify_database(conn, args.stream, progress=progress)
    if args.stream is not None and not report.events_checked:
        return no_events(args.stream)  # a typo must not read as a verified stream
    print_report(report, args.json)
    return OK if report.ok else FOUND


async def verify_against_checkpoint(args: argparse.Namespace, progress: Callable[[Report], None]) -> int:
    """Signature first (nothing else is worth checking against a forged checkpoint), then every chain
    and the tree; on a mismatch, the first differing position from a baseline export that matches the
    checkpoint (--baseline), or else from the server's proofs (--url)."""
    from backend.audit import auditor
    from backend.audit.export import read_export
    from backend.audit.verify import Report, verify

    checkpoint, document = auditor.load_checkpoint(read_small(args.checkpoint), str(args.checkpoint))
    pinned = read_small(args.public_key) if args.public_key is not None else None
    public = auditor.public_key_for(document, pinned)
    if not checkpoint.verify(public):
        check = auditor.TreeCheck(checkpoint.tree_size, checkpoint.root_hash.hex(), checkpoint.timestamp,
                                  checkpoint.key_id, signature_ok=False, detail="signature invalid")
        if args.json:
            sys.stdout.buffer.write(orjson.dumps({"ok": False, "checkpoint": check.as_dict()},
                                                 option=orjson.OPT_INDENT_2) + b"\n")
        print(f"FAILED: checkpoint {args.checkpoint}: signature invalid", file=sys.stdout if not args.json
              else sys.stderr)
        return FOUND
    report = Report(source="export")
    collector = auditor.LeafCollector(checkpoint.tree_size)
    with open_input(args.export) as file:
        await verify(auditor.collecting(read_export(file), collector), report, contiguous=True, progress=progress)
    check = auditor.compare(checkpoint, collector.leaves)
    if not check.root_ok and args.baseline is not None:
        baseline = auditor.LeafCollector(checkpoint.tree_size)
        with open_input(args.baseline) as file:
            async for batch in read_export(file):
                baseline.add(batch)
        index = auditor.first_difference_offline(checkpoint, baseline.leaves, collector.leaves)
        if index is None:
            check.detail += f"; the baseline {args.baseline} does not give the checkpoint's root either"
        else:
            check.first_differing_position = index + 1
    elif not check.root_ok and args.url:
        async with http_session() as session:
            client = auditor.Client(session, args.url, api_key(args))
            try:
                index = await auditor.first_difference(client, checkpoint, collector.leaves)
                check.first_differing_position = index + 1
            except (auditor.ServerTreeMismatch, auditor.AuditError) as exc:  # the mismatch stands either way
                check.detail += f"; cannot locate the change: {exc}"
    elif not check.root_ok:  # a shorter export with every chain intact may still differ before its end
        check.detail += "; name the first differing position with --baseline or --url"
    if args.json:
        body = {**report.as_dict(), "ok": report.ok and check.ok, "checkpoint": check.as_dict()}
        sys.stdout.buffer.write(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print_report(report, False)
        print_tree_check(check)
    return OK if report.ok and check.ok else FOUND


def print_tree_check(check: Any) -> None:
    print(f"checkpoint:      tree_size {check.tree_size} root {check.root_hash} at {check.timestamp}")
    print(f"signature:       {'valid' if check.signature_ok else 'INVALID'} (key {check.key_id})")
    print(f"tree:            {check.detail}")
    if check.first_differing_position is not None:
        print(f"first differing position: {check.first_differing_position}")
    print("OK: the export matches the signed checkpoint" if check.ok
          else "FAILED: the export does not match the signed checkpoint")


def api_key(args: argparse.Namespace) -> str | None:
    return args.key or os.environ.get("TALLY_API_KEY") or None


@asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)) as session:
        yield session


@contextmanager
def open_input(path: Path) -> Iterator[IO[bytes]]:
    """The export file (- for stdin); a malformed line is reported with the file it is in, as the
    same line number can be in --export and in --baseline."""
    from backend.audit.export import ExportFormatError

    with stdin_copy() if str(path) == "-" else path.open("rb") as file:
        try:
            yield file
        except ExportFormatError as exc:
            raise ExportFormatError(f"{'stdin' if str(path) == '-' else path}: {exc}") from None


MAX_SMALL_FILE = 1 << 20
"""A key or checkpoint file is a few hundred bytes: anything past this is not one (/dev/zero never ends)."""


def read_small(path: Path) -> bytes:
    from backend.audit.auditor import AuditError

    with path.open("rb") as file:
        data = file.read(MAX_SMALL_FILE + 1)
    if len(data) > MAX_SMALL_FILE:
        raise AuditError(f"{path}: larger than {MAX_SMALL_FILE >> 20} MiB: not a key or a checkpoint")
    return data


def stdin_copy() -> IO[bytes]:
    if sys.stdin is None:  # started with stdin closed: Python has no sys.stdin at all
        raise OSError("stdin is closed: nothing to read for -")
    return os.fdopen(os.dup(sys.stdin.fileno()), "rb")


def print_report(report: Report, as_json: bool) -> None:
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return
    what = f"stream {report.stream}" if report.stream else "a range of the log" if report.partial else "the whole log"
    where = f" (positions {report.first_position}..{report.last_position})" if report.events_checked else ""
    print(f"{report.source}: {what}{where}{' [partial export]' if report.partial else ''}")
    print(f"streams checked: {report.streams_checked:,}")
    print(f"events checked:  {report.events_checked:,} in {report.elapsed_s:.2f} s ({report.events_per_s:,.0f}/s)")
    print(f"breaks:          {report.break_count}" + (" (first shown)" if report.break_count > len(report.breaks)
                                                       else ""))
    for found in report.breaks:
        of_stream = f" stream {found.stream_id} version {found.version}" if found.stream_id is not None else ""
        print(f"  {found.kind}:{of_stream} position {found.position} expected {found.expected} found {found.found}")
    print("OK: every hash chain verifies" if report.ok else "FAILED: the log does not match its hash chains")
    if report.source == "export" and not report.partial and (report.first_position or 1) > 1:
        print(f"(the export starts at position {report.first_position}: if it was made with --after, "
              "verify it with --partial)")


# ---------------------------------------------------------------- export


async def export(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.export import export_pages
    from backend.audit.verify import head

    async with connection(settings) as conn:
        to = export_end(args, await head(conn))
        span = f"positions {args.after + 1}..{to}" if to > args.after else f"no event after position {args.after}"
        say(args, f"exporting {span}")
        with open_output(args.out) if args.out is not None else nullcontext(sys.stdout.buffer) as out:
            count = await write_pages(export_pages(conn, args.after, to), out, args, to)
    say(args, f"exported {count:,} events ({span})")
    return OK


def export_end(args: argparse.Namespace, log_head: int) -> int:
    """--to, or the head: a range past the head would export differently once the log grows, though
    both exports would claim the same range (the API refuses such positions too)."""
    from backend.audit.auditor import AuditError

    to = args.to if args.to is not None else log_head
    if to > log_head:
        raise AuditError(f"--to {to} is beyond the head of the log ({log_head})")
    if args.after > to:
        end = f"--to {to}" if args.to is not None else f"the head of the log ({log_head})"
        raise AuditError(f"--after {args.after} is beyond {end}: nothing to export")
    return to


@contextmanager
def open_output(path: Path) -> Iterator[IO[bytes]]:
    """FILE.partial, renamed over FILE at the end so that an interrupted write never looks complete,
    and removed if the write fails. Only over a regular file: the rename would replace a device or a
    FIFO with a file."""
    from backend.audit.auditor import AuditError

    if path.exists() and not path.is_file():
        raise AuditError(f"--out {path}: exists and is not a regular file")
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("wb") as out:
            yield out
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


async def write_pages(pages: AsyncIterator[bytes], out: IO[bytes], args: argparse.Namespace, to: int) -> int:
    count = 0
    async for chunk in pages:
        out.write(chunk)
        lines = chunk.count(b"\n")
        count += lines
        if count % 100_000 < lines:
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
            return no_events(args.stream, args.to_position)
    return OK


def no_events(stream: str, to_position: int | None = None) -> int:
    print(f"tally: error: stream {stream!r} has no events"
          + (f" up to position {to_position}" if to_position is not None else ""), file=sys.stderr)
    return FAILED


def print_step(event: dict[str, Any], state: dict[str, Any] | None) -> None:
    data = orjson.dumps(event["data"], option=orjson.OPT_SORT_KEYS).decode()
    print(f"v{event['version']}  position {event['position']}  {event['recorded_at']}  {event['type']}  {data}")
    if state is not None:
        print(f"    state: {orjson.dumps(state, default=str).decode()}")


# ---------------------------------------------------------------- diff-projections


async def diff_projections(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.projections_diff import diff_all

    async with direct_sessions(settings) as connect:
        report = await diff_all(connect, progress=lambda text: say(args, text))
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


# ---------------------------------------------------------------- the Merkle tree's checkpoints


async def keygen(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit.signing import keygen as write_key

    try:
        key_id = write_key(args.out)
    except FileExistsError:
        print(f"tally: error: {args.out} exists: a signing key is never overwritten", file=sys.stderr)
        return FAILED
    print(f"wrote an Ed25519 signing key to {args.out} (mode 0600); key_id {key_id}")
    print(f"tally: set AUDIT_SIGNING_KEY_FILE={args.out} and keep the file out of backups you do not trust",
          file=sys.stderr)
    return OK


LATEST = "/v1/audit/checkpoints/latest"


async def checkpoint(settings: Settings, args: argparse.Namespace) -> int:
    """Fetch the latest checkpoint and the public key (or use the pinned one), check the signature,
    write the checkpoint with the key it was checked with."""
    from backend.audit import auditor
    from backend.audit.signing import raw_public

    async with http_session() as session:
        client = auditor.Client(session, args.url, api_key(args))
        if args.public_key is not None:
            public = auditor.public_key_for({}, read_small(args.public_key))
        else:
            public = await client.public_key()
        document = await client.get(LATEST)
    found, _ = auditor.load_checkpoint(orjson.dumps(document), f"GET {LATEST}")
    if not found.verify(public):
        print(f"FAILED: the server's latest checkpoint (tree_size {found.tree_size}): signature invalid")
        return FOUND
    document["public_key"] = raw_public(public).hex()
    with open_output(args.out) as out:
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"checkpoint tree_size {found.tree_size} root {found.root_hash.hex()} at {found.timestamp}: "
          f"signature valid; written to {args.out}")
    return OK


async def consistency(settings: Settings, args: argparse.Namespace) -> int:
    from backend.audit import auditor

    pinned = read_small(args.public_key) if args.public_key is not None else None
    loaded = [(path, *auditor.load_checkpoint(read_small(path), str(path))) for path in (args.old, args.new)]
    (_, old, _), (_, new, _) = loaded  # a list, not a dict by path: OLD and NEW may be the same file
    for path, found, document in loaded:
        if not found.verify(auditor.public_key_for(document, pinned)):
            return print_consistency(args, old, new, False, f"checkpoint {path}: signature invalid")
    async with http_session() as session:
        ok, detail = await auditor.check_consistency(auditor.Client(session, args.url, api_key(args)), old, new)
    return print_consistency(args, old, new, ok, detail)


def print_consistency(args: argparse.Namespace, old: Any, new: Any, ok: bool, detail: str) -> int:
    if args.json:
        sys.stdout.buffer.write(orjson.dumps({"ok": ok, "old": old.tree_size, "new": new.tree_size,
                                              "detail": detail}) + b"\n")
    else:
        print(("OK: " if ok else "FAILED: ") + detail)
    return OK if ok else FOUND
