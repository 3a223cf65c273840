#!/usr/bin/env python3
"""Tally's benchmarks: `python scripts/bench.py SUBCOMMAND [options]`.

Each subcommand lives in `scripts/bench_<name>.py`, a module with a one-line docstring (the help text),
`add_arguments(parser)` and `async def run(args) -> dict`. The module prints its own readable report;
the dict it returns is printed here as the last line of output, one JSON object, for machines.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

SUBCOMMANDS: dict[str, str] = {
    "store": "bench_store",
    "http": "bench_http",
    "sse": "bench_sse",
    "audit": "bench_audit",
    "replay": "bench_replay",
    "instructions": "bench_instructions",
    "ab": "bench_ab",
    "authflood": "bench_authflood",
    "limits": "bench_limits",
    "decode": "bench_decode",
    "fold": "bench_fold",
}
"""Subcommand name -> module in scripts/."""


class Benchmark(Protocol):
    """What a `bench_<name>` module provides."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    async def run(self, args: argparse.Namespace) -> dict[str, Any]: ...


def load(module_name: str) -> Benchmark:
    scripts = str(Path(__file__).resolve().parent)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # psycopg, eventsourcing[postgres]: the peers some benches compare with
        sys.exit(f"bench.py: {exc.name} is missing: install the bench extra "
                 "(pip install -c constraints.txt -e '.[bench]'; ./scripts/test installs it)")
    return cast(Benchmark, module)


def build_parser(chosen: str | None) -> tuple[argparse.ArgumentParser, dict[str, Benchmark]]:
    """Only the chosen subcommand's module is imported (all of them for plain `--help`)."""
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    benchmarks: dict[str, Benchmark] = {}
    for name, module_name in SUBCOMMANDS.items():
        if chosen not in (None, name):
            sub.add_parser(name, help=f"see `bench.py {name} --help`")
            continue
        benchmark = load(module_name)
        doc = (getattr(benchmark, "__doc__", None) or name).strip().splitlines()[0]
        benchmark.add_arguments(sub.add_parser(name, help=doc, description=doc))
        benchmarks[name] = benchmark
    return parser, benchmarks


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser, benchmarks = build_parser(chosen if chosen in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = asyncio.run(benchmarks[args.subcommand].run(args))
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    print(json.dumps(result, separators=(", ", ": ")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
