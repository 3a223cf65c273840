"""This checkout against another commit, side by side: server CPU per command of `http`'s mix, interleaved.

The machine's speed drifts within minutes, so two `bench.py http` runs a minute apart cannot tell a
small change from the drift (docs/PERFORMANCE.md), and `bench.py instructions` counts instructions, which
overstate what interpreter-bound savings buy in time. Here both servers run at once, each on a fresh
database: this checkout's (A) and the base commit's (B, from a temporary git worktree). wrk drives
them in turn, in short slices ordered A B B A A B ..., so that a drift weighs on both alike; each
slice records its server's user and system CPU per command (psutil) and its commands/s. The summary
compares the means and gives the median of the paired ratios A/B.

The run is two legs with fresh databases and servers each: in the first A serves the database created
first, in the second the one created second. Against itself (`--base HEAD`), the side on the database
created first read more CPU per command in every run (docs/PERFORMANCE.md); swapping halfway cancels
whatever makes that so.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from bench_http import ROOT, free_port, run_wrk, seed_wallets, serve_env, use_wrk, wait_ready
from bench_store import Server, chosen_server, fresh_database


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare with (default HEAD~1)")
    parser.add_argument("--dsn", help="PostgreSQL server to create the two bench databases on")
    parser.add_argument("--slices", type=int, default=8, help="measured slices per side (default 8)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of a slice (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent client connections")
    parser.add_argument("--wallets", type=int, default=200, help="wallets the mix spreads over")
    parser.add_argument("--quick", action="store_true", help="4 slices of 3 s per side: under a minute")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="B is this checkout too, its pools through a PgBouncer in transaction mode (Debian's "
                             "pgbouncer, started here) and DIRECT_DATABASE_URL direct: what the pooler costs")


@dataclass
class Side:
    name: str
    root: Path
    proc: subprocess.Popen[bytes]
    base_url: str
    token: str
    wallets: list[str]
    slices: list[dict[str, float]] = field(default_factory=list)

    async def slice(self, connections: int, seconds: float) -> dict[str, float]:
        server = psutil.Process(self.proc.pid)
        before = server.cpu_times()
        result, _ = await run_wrk("bench_http.lua", self.base_url, connections, seconds, self.token, *self.wallets)
        after = server.cpu_times()
        commands = result["requests"]
        if result["errors"] or result["socket_errors"] or not commands:
            raise RuntimeError(f"{self.name}: the mix failed: {result}")
        return {"user_us": (after.user - before.user) / commands * 1e6,
                "sys_us": (after.system - before.system) / commands * 1e6,
                "commands_per_s": commands / (result["duration_us"] / 1e6),
                "p99_ms": result["p99_us"] / 1000}


@contextlib.contextmanager
def worktree(revision: str) -> Any:
    path = Path(tempfile.mkdtemp(prefix="tally-ab-"))
    subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), revision], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


def admin_token(root: Path, env: dict[str, str]) -> str:
    """Through that checkout's own CLI, which also migrates its database as that checkout does."""
    out = subprocess.run([sys.executable, "-m", "backend", "keys", "create", "--owner", "bench", "--scopes", "admin"],
                         cwd=root, env=env, check=True, capture_output=True, text=True).stdout
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("token: "))


@contextlib.asynccontextmanager
async def side(name: str, root: Path, dsn: str, wallets: int, **extra: str) -> AsyncIterator[Side]:
    port = free_port()
    env = serve_env(dsn, port, PYTHONPATH=str(root), **extra)
    token = admin_token(root, env)
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=root, env=env)  # noqa: ASYNC220
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base_url, proc)
        seeded = await seed_wallets(base_url, {"Authorization": f"Bearer {token}"}, wallets)
        yield Side(name, root, proc, base_url, token, seeded)
    finally:
        proc.terminate()
        proc.wait(30)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@dataclass(frozen=True)
class Base:
    """What B serves, made once for both legs: a worktree of the base commit, or this checkout with its
    pools through a PgBouncer (one for every database of the server) when `bouncer_dsn` is set."""

    root: Path
    bouncer_dsn: Callable[[str], str] | None = None

    def served(self, dsn: str) -> tuple[str, dict[str, str]]:
        """The DSN B's pools use for database `dsn`, and B's extra settings."""
        if self.bouncer_dsn is None:
            return dsn, {}
        return self.bouncer_dsn(dsn), {"DIRECT_DATABASE_URL": dsn, "DATABASE_POOL_MODE": "transaction"}


def make_base(stack: contextlib.ExitStack, args: argparse.Namespace, server: Server, revision: str) -> Base:
    if not args.pgbouncer:
        return Base(stack.enter_context(worktree(revision)))
    sys.path.insert(0, str(ROOT))  # the suite's PgBouncer launcher, written once
    from tests.integration.pgbouncer.bouncer import running_pgbouncer

    return Base(ROOT, stack.enter_context(running_pgbouncer(server.admin_dsn, pool_size=20)).dsn_for)


async def run_leg(args: argparse.Namespace, server: Server, base: Base, slices: int, *,
                  a_first: bool) -> dict[str, list[dict[str, float]]]:
    """Both servers on fresh databases, A on the one created first (or second), warmed, then `slices`
    measured slices each, alternating."""
    seconds = 3.0 if args.quick else args.seconds
    async with fresh_database(server, "ab_1") as first, fresh_database(server, "ab_2") as second:
        dsn_a, dsn_b = (first, second) if a_first else (second, first)
        dsn_b_served, extra = base.served(dsn_b)
        async with side("A", ROOT, dsn_a, args.wallets) as a, \
                side("B", base.root, dsn_b_served, args.wallets, **extra) as b:
            for warm in (a, b):  # caches and prepared statements, unmeasured
                await warm.slice(args.connections, seconds)
            for i in range(slices):
                for current in ((a, b) if i % 2 == 0 else (b, a)):
                    measured = await current.slice(args.connections, seconds)
                    current.slices.append(measured)
                    print(f"  {current.name}: {measured['commands_per_s']:6.0f} commands/s, p99 "
                          f"{measured['p99_ms']:5.1f} ms, server CPU {measured['user_us']:4.0f} us user + "
                          f"{measured['sys_us']:3.0f} us system per command", flush=True)
    return {"A": a.slices, "B": b.slices}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not use_wrk("wrk"):
        raise SystemExit("wrk is not installed")
    slices = 4 if args.quick else args.slices
    revision = "pgbouncer" if args.pgbouncer else subprocess.run(  # noqa: ASYNC221 (before any server)
        ["git", "rev-parse", "--short", args.base], cwd=ROOT,
        check=True, capture_output=True, text=True).stdout.strip()
    async with chosen_server(args.dsn) as server:
        with contextlib.ExitStack() as stack:
            base = make_base(stack, args, server, revision)
            first_leg = (slices + 1) // 2
            measured: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
            for leg, leg_slices in enumerate((first_leg, slices - first_leg)):
                if leg_slices:
                    for name, taken in (await run_leg(args, server, base, leg_slices, a_first=leg == 0)).items():
                        measured[name] += taken
    cpu = {name: [x["user_us"] + x["sys_us"] for x in taken] for name, taken in measured.items()}
    ratio = statistics.median(x / y for x, y in zip(cpu["A"], cpu["B"], strict=True))
    base_label = "through PgBouncer" if args.pgbouncer else f"base {revision}"
    for name, label in (("A", "this checkout"), ("B", base_label)):
        taken = measured[name]
        print(f"{name} ({label}): server CPU {mean(cpu[name]):.0f} us per command "
              f"(user {mean([x['user_us'] for x in taken]):.0f}), "
              f"{mean([x['commands_per_s'] for x in taken]):.0f} commands/s, "
              f"p99 {statistics.median(x['p99_ms'] for x in taken):.1f} ms (median slice)")
    print(f"A/B server CPU per command, median of {slices} paired slices: {ratio:.3f}")
    return {"bench": "ab", "base": revision, "cpu_us_per_command": round(mean(cpu["A"]), 1),
            "base_cpu_us_per_command": round(mean(cpu["B"]), 1), "ratio": round(ratio, 4)}
