"""`python -m backend projections status | rebuild NAME... | rebuild --all`.

backend/__main__.py calls add_subcommands(subparsers) and, for `projections`, run(settings, args).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from backend.config import Settings, env_help, int_between
from backend.db import create_pool, mask_dsn
from backend.store.migrate import require_migrated
from projections import registry
from projections.progress import Progress
from projections.rebuild import SCHEMAS, AlreadyRebuilding, RebuildError, rebuild
from projections.service import connector
from projections.status import ProjectionStatus, status


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("projections", help="projection status and rebuilds", epilog=env_help())
    commands = parser.add_subparsers(dest="projections_command", required=True)
    show = commands.add_parser("status", help="checkpoint, head, lag and state of every projection",
                               epilog=env_help() + ". Never migrates: an unmigrated database is exit status 2. "
                               "A schema left by a rebuild that did not finish is noted on stderr")
    show.add_argument("--json", action="store_true", help="one JSON object per projection instead of a table")
    again = commands.add_parser("rebuild", help="replay the log into fresh tables and swap them in",
                                epilog=env_help() + ". Never migrates: an unmigrated database is exit status 2. "
                                "Exit status 1: the rebuild failed (its fresh tables are dropped); "
                                f"{BUSY}: another rebuild of a projection named is running (nothing is changed)")
    again.add_argument("names", nargs="*", metavar="NAME", help=f"one or more of: {', '.join(registry.names())}")
    again.add_argument("--all", action="store_true", help="rebuild every projection")
    again.add_argument("--batch-size", type=batch_size, default=20_000,
                       help=f"events per batch, 1 to {MAX_BATCH_SIZE:,} (default 20000)")


BUSY = 3
"""Exit status of a rebuild refused because another rebuild of a projection it names is running."""

MAX_BATCH_SIZE = 1_000_000
"""A batch is one transaction of one projection: far beyond this, its memory is the limit."""


batch_size = int_between(1, MAX_BATCH_SIZE)
"""--batch-size: 0 made the rebuild loop for ever without reading; a negative one failed in SQL."""


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run the chosen subcommand; the exit status."""
    handlers: dict[str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "status": show_status,
        "rebuild": run_rebuild,
    }
    try:
        return asyncio.run(handlers[args.projections_command](settings, args))
    except (RebuildError, KeyError) as exc:  # backend/__main__.py reports the database's own errors (2)
        print(f"tally: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        if isinstance(exc, AlreadyRebuilding):
            return BUSY  # a script may wait and try again: nothing failed
        return 2 if isinstance(exc, KeyError) else 1  # an unknown name is bad input, as argparse's errors are


async def show_status(settings: Settings, args: argparse.Namespace) -> int:
    from backend.dsn import database_dsn

    async with database_dsn(settings) as dsn:
        pool = await create_pool(dsn, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}),
                                 writable=False)
        try:
            async with pool.acquire() as conn:
                await require_migrated(conn, mask_dsn(dsn))
            found = await status(pool, registry.names())
            left = await SCHEMAS.leftovers(pool)
        finally:
            await pool.close()
    for schema in left:
        print(f"tally: note: schema {schema} is left from a rebuild that did not finish; the next rebuild drops it",
              file=sys.stderr)
    if args.json:
        for item in found:
            print(json.dumps(item.as_dict()))
    else:
        print(format_table(found))
    return 1 if any(item.state == "failed" for item in found) else 0


def format_table(found: list[ProjectionStatus]) -> str:
    header = f"{'name':<14}{'checkpoint':>12}{'head':>12}{'lag':>10}{'lag s':>9}  {'state':<9}error"
    lines = [header, "-" * len(header)]
    for s in found:
        state = s.state + ("+rebuild" if s.rebuilding else "")
        error = f"at {s.failed_position}: {s.error}" if s.error else ""
        lines.append(f"{s.name:<14}{s.checkpoint:>12}{s.head:>12}{s.lag_events:>10}{s.lag_s:>9.2f}  {state:<9}{error}")
    return "\n".join(lines)


async def run_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from backend.dsn import database_dsn

    if args.all == bool(args.names):
        print("tally: error: name the projections to rebuild, or give --all", file=sys.stderr)
        return 2
    chosen = registry.all_projections() if args.all else registry.select(args.names)
    label = "rebuild " + ",".join(p.name for p in chosen)
    async with database_dsn(settings) as dsn:
        pool = await create_pool(dsn, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}))
        try:
            async with pool.acquire() as conn:
                await require_migrated(conn, mask_dsn(dsn))
        finally:
            await pool.close()
        bar = Progress(label, 0)
        result = await rebuild(connector(settings.direct_dsn(dsn), settings), chosen, batch_size=args.batch_size,
                               report=bar.update)
        bar.finish()
    print(f"rebuilt {', '.join(result.names)}: {result.events:,} events in {result.seconds:.1f} s "
          f"({result.events_per_s:,.0f} events/s); checkpoints {result.checkpoints}")
    return 0
