"""Instructions per command under valgrind (callgrind): `http`'s mix, a fixed number of commands, counted, not timed.

On a machine whose speed drifts within minutes, commands/s cannot tell two commits apart by a few
percent; instructions can: the same code, inputs and concurrency give nearly the same count, whatever
else the machine is doing (docs/PERFORMANCE.md says how nearly). The server (`python -m backend
serve`) runs under callgrind with instrumentation off; after seeding and a warm-up, it is switched on
for N commands of `bench.py http`'s mix (from a Python client in this process, C connections),
then off. The same is done for the bare aiohttp handler of `bench.py http` (one small JSON request
each), the scale reference: Tally's instructions per command over the bare handler's per
request is the deterministic twin of `http`'s "commands/s as a share of the bare handler's".

Counts are user-space instructions of the server process only (not the kernel's, not PostgreSQL's),
and under callgrind the server runs many times slower, so appends batch more than at full speed:
compare counts with counts, from the same settings.

With `--cache`, callgrind also simulates the per-core caches and counts the misses of each level: two
commits with the same instructions per command can still differ in time by how much of what a command
touches stays in the L2 (docs/PERFORMANCE.md, "Where `ab`'s gap goes").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from bench_http import ROOT, Mix, admin_token, free_port, seed_wallets, serve_env, wait_ready
from bench_store import chosen_server, fresh_database

BARE_BODY = {"amount": 250, "reference": "d"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL server to create the bench database on")
    parser.add_argument("--commands", type=int, default=1000, help="commands counted (default 1000)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent client connections (default 16)")
    parser.add_argument("--wallets", type=int, default=100, help="wallets the mix spreads over")
    parser.add_argument("--quick", action="store_true", help="300 commands: whole run under 60 s")
    parser.add_argument("--cache", action="store_true",
                        help="also simulate the caches (32 KiB L1s, --l2-kib of L2) and count misses per command")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the server's callgrind dumps in DIR (tally.out.<pid>.<n>), for callgrind_annotate")
    parser.add_argument("--l2-kib", type=int, default=1024, help="the simulated L2 (default 1024: this machine's "
                        "per core; callgrind calls it the last level)")


CACHE_EVENTS = {"L1": ("I1mr", "D1mr", "D1mw"), "L2": ("ILmr", "DLmr", "DLmw")}
"""callgrind's miss counters, read and written, summed by level (its 'LL' is the simulated L2)."""


def cache_options(args: argparse.Namespace) -> list[str]:
    """callgrind's cache simulation as this machine's per-core caches (AMD EPYC: 32 KiB 8-way L1s,
    an 8-way L2), or nothing. The L3 is not simulated: on a shared host it is shared with other
    tenants, so what misses the L2 may well go to memory."""
    if not args.cache:
        return []
    return ["--cache-sim=yes", "--I1=32768,8,64", "--D1=32768,8,64", f"--LL={args.l2_kib * 1024},8,64"]


class Callgrind:
    """A process under callgrind, instrumentation off until `count()`; its counts (instructions, misses)."""

    def __init__(self, command: list[str], env: dict[str, str], options: list[str]) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="tally-callgrind-"))
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", *options,
             f"--callgrind-out-file={self.out}/out.%p", *command],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True, capture_output=True)

    async def count(self, work: Callable[[], Awaitable[int]]) -> tuple[dict[str, int], int]:
        """Run work with instrumentation on; (its counts by event: "Ir" the instructions, and with the cache
        simulation the misses, units of work it reports)."""
        self.control("-i", "on")
        done = await work()
        self.control("-i", "off")
        self.control("-d")
        totals: dict[str, int] = {}
        for dump in self.out.glob("out.*"):
            names: list[str] = []
            for line in dump.read_text().splitlines():
                if line.startswith("events:"):
                    names = line.split()[1:]
                elif line.startswith("totals:"):
                    for name, value in zip(names, line.split()[1:], strict=True):
                        totals[name] = totals.get(name, 0) + int(value)
        return totals, done

    def stop(self, keep: Path | None = None) -> None:
        """Stop the process; its dumps go to the directory `keep` (named `tally.` and callgrind's name), or away."""
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for dump in self.out.glob("out.*"):
                shutil.copy(dump, keep / f"tally.{dump.name}")
        shutil.rmtree(self.out, ignore_errors=True)


async def run_mix(base: str, headers: dict[str, str], wallets: list[str], count: int, connections: int,
                  seed: int) -> int:
    """About count requests of the mix, every request counting as one command (as wrk counts them in
    `bench.py http`); the number made. Any error stops the run: a failed command costs less."""
    done = 0
    async with aiohttp.ClientSession(base, headers=headers) as session:
        mix = Mix(session, wallets)

        async def worker(i: int) -> None:
            nonlocal done
            rng = random.Random(seed * 1000 + i)
            while done < count:
                made = await mix.one_command(rng)  # not `done += await ...`: that reads done before awaiting
                done += made
                if mix.errors:
                    raise RuntimeError(f"the mix failed: {mix.errors}")

        await asyncio.gather(*(worker(i) for i in range(connections)))
    return done


async def tally(dsn: str, args: argparse.Namespace, count: int) -> tuple[dict[str, int], int]:
    token = await admin_token(dsn)
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    server = Callgrind([sys.executable, "-m", "backend", "serve"], serve_env(dsn, port), cache_options(args))
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, server.proc, timeout=600)
        wallets = await seed_wallets(base, headers, args.wallets)
        await run_mix(base, headers, wallets, 300, args.connections, seed=1)  # warm-up: caches, prepared statements
        return await server.count(lambda: run_mix(base, headers, wallets, count, args.connections, seed=2))
    finally:
        server.stop(args.keep)


async def bare(args: argparse.Namespace, count: int) -> tuple[dict[str, int], int]:
    port = free_port()
    server = Callgrind([sys.executable, str(ROOT / "scripts" / "bench_http_bare.py"), str(port)], {**os.environ},
                       cache_options(args))
    base = f"http://127.0.0.1:{port}"

    async def requests(n: int) -> int:
        async with aiohttp.ClientSession(base) as session:
            async def worker(share: int) -> None:
                for _ in range(share):
                    async with session.post("/bare", json=BARE_BODY) as reply:
                        await reply.read()

            await asyncio.gather(*(worker(n // args.connections) for _ in range(args.connections)))
        connections: int = args.connections
        return n // connections * connections

    try:
        for _ in range(600):
            try:
                await requests(args.connections)
                break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        await requests(300)
        return await server.count(lambda: requests(count))
    finally:
        server.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    count = 300 if args.quick else args.commands
    async with chosen_server(args.dsn) as server, fresh_database(server, "instr") as dsn:
        counts, commands = await tally(dsn, args, count)
    bare_counts, requests = await bare(args, count)
    per_command = counts["Ir"] / commands
    per_request = bare_counts["Ir"] / requests
    print(f"server: {server.description}; {args.connections} connections, {args.wallets} wallets; "
          "user-space instructions of the server process under callgrind")
    print(f"Tally: {per_command / 1000:,.1f} k instructions per command ({commands} commands of the http mix)")
    print(f"bare aiohttp handler (scripts/bench_http_bare.py): {per_request / 1000:,.1f} k per request; "
          f"Tally's command costs {per_command / per_request:.1f} of those")
    result = {"bench": "instructions", "instructions_per_command": round(per_command),
              "bare_instructions_per_request": round(per_request), "commands": commands}
    if args.cache:
        for level, events in CACHE_EVENTS.items():
            misses = sum(counts[event] for event in events) / commands
            bare_misses = sum(bare_counts[event] for event in events) / requests
            print(f"{level} misses (simulated: {' + '.join(events)}): {misses:,.0f} per command, "
                  f"bare handler {bare_misses:,.0f} per request")
            result[f"{level.lower()}_misses_per_command"] = round(misses)
            result[f"bare_{level.lower()}_misses_per_request"] = round(bare_misses)
    return result
