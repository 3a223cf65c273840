"""Instructions per command under valgrind (callgrind): `http`'s mix, a fixed number of commands, counted, not timed.

On a machine whose speed drifts within minutes, commands/s cannot tell two commits apart by a few
percent; instructions can: the same code, inputs and concurrency give nearly the same count, whatever
else the machine is doing (docs/PERFORMANCE.md says how nearly). The server (`python -m backend
serve`) runs under callgrind with instrumentation off; after seeding and a warm-up, it is switched on
for N commands of `bench.py http`'s mix (from a Python client in this process, C connections),
then off. The same is done for the bare aiohttp handler of `bench.py http` (one small JSON request
each), the issue's scale reference: Tally's instructions per command over the bare handler's per
request is the deterministic twin of `http`'s "commands/s as a share of the bare handler's".

Counts are user-space instructions of the server process only (not the kernel's, not PostgreSQL's),
and under callgrind the server runs many times slower, so appends batch more than at full speed:
compare counts with counts, from the same settings.
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


class Callgrind:
    """A process under callgrind, instrumentation off until `counting()`; its instruction count."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="tally-callgrind-"))
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}/out.%p",
             *command], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True, capture_output=True)

    async def count(self, work: Callable[[], Awaitable[int]]) -> tuple[int, int]:
        """Run work with instrumentation on; (instructions, units of work it reports)."""
        self.control("-i", "on")
        done = await work()
        self.control("-i", "off")
        self.control("-d")
        total = 0
        for dump in self.out.glob("out.*"):
            for line in dump.read_text().splitlines():
                if line.startswith("totals:"):
                    total += int(line.split()[1])
        return total, done

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
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


async def tally(dsn: str, args: argparse.Namespace, count: int) -> tuple[int, int]:
    token = await admin_token(dsn)
    headers = {"Authorization": f"Bearer {token}"}
    port = free_port()
    server = Callgrind([sys.executable, "-m", "backend", "serve"], serve_env(dsn, port))
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, server.proc, timeout=600)
        wallets = await seed_wallets(base, headers, args.wallets)
        await run_mix(base, headers, wallets, 300, args.connections, seed=1)  # warm-up: caches, prepared statements
        return await server.count(lambda: run_mix(base, headers, wallets, count, args.connections, seed=2))
    finally:
        server.stop()


async def bare(args: argparse.Namespace, count: int) -> tuple[int, int]:
    port = free_port()
    server = Callgrind([sys.executable, str(ROOT / "scripts" / "bench_http_bare.py"), str(port)], {**os.environ})
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
        instructions, commands = await tally(dsn, args, count)
    bare_instructions, requests = await bare(args, count)
    per_command = instructions / commands
    per_request = bare_instructions / requests
    print(f"server: {server.description}; {args.connections} connections, {args.wallets} wallets; "
          "user-space instructions of the server process under callgrind")
    print(f"Tally: {per_command / 1000:,.1f} k instructions per command ({commands} commands of the http mix)")
    print(f"bare aiohttp handler (scripts/bench_http_bare.py): {per_request / 1000:,.1f} k per request; "
          f"Tally's command costs {per_command / per_request:.1f} of those")
    return {"bench": "instructions", "instructions_per_command": round(per_command),
            "bare_instructions_per_request": round(per_request), "commands": commands}
