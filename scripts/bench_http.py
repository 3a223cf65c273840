"""Commands over real HTTP against a `serve` process: throughput, latency, errors, where the CPU went.

The server is started as `./scripts/serve` starts it (`python -m backend serve`, migrations at startup)
on a fresh database. A load generator in a separate process keeps C connections busy for a fixed
time with a mix of 60 % debit/credit, 20 % reserve then confirm or rollback, 20 % wallet reads; every
POST carries a unique Idempotency-Key, as a careful payment client's would. Wallets are seeded with
large balances so that no command is refused for want of funds: any non-2xx answer counts as an error.
With wrk, every round of Tally is followed by a round of a bare aiohttp handler (bench_http_bare.py) under
the same settings: the scale reference, measured on this machine at this moment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
from bench_store import Server, chosen_server, fresh_database, percentile

from backend.commands.api_keys import mint
from backend.db import init_connection
from backend.store.event_store import EventStore
from backend.store.migrate import migrate
from backend.store.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
SEED = 10**12
QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL server to create the bench database on")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time (default 20)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent client connections")
    parser.add_argument("--wallets", type=int, default=200, help="wallets the mix spreads over")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of Tally then the bare reference, sharing --seconds; the median is reported "
                             "(default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="8 s measured, whole run under 60 s")
    parser.add_argument("--workers", type=worker_counts, default=[1], metavar="N[,N...]",
                        help="serve with each of these worker counts (serve --workers N), in alternating rounds "
                             "on one database (default 1)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto",
                        help="wrk with scripts/bench_http.lua (auto: when wrk is installed, e.g. "
                             "`apt-get install wrk`), or the Python load generator")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(dsn: str, port: int, **extra: str) -> dict[str, str]:
    """The environment a bench's `serve` runs with: its database and port, quiet logs, a pool as large as
    the bench needs and no rate limit (the load is the point), plus extra settings."""
    return {**os.environ, "DATABASE_URL": dsn, "PORT": str(port), "LOG_LEVEL": "WARNING", "POOL_MAX_SIZE": "20",
            "RATE_LIMIT_PER_S": "0", **extra}


async def admin_token(dsn: str) -> str:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2, init=init_connection)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        store = EventStore(pool)
        minted = mint("bench", "bench admin", ["admin"], None, datetime.now(UTC))
        await Repository(store).save(minted.key)
        await store.close()
        return minted.token
    finally:
        await pool.close()


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the server exited during startup")
            try:
                async with session.get(f"{base}/health/ready") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("the server did not become ready")


async def seed_wallets(base: str, headers: dict[str, str], count: int) -> list[str]:
    """Open and fund the wallets, then wait until the read model has them (the mix reads them at once)."""
    async with aiohttp.ClientSession(base, headers=headers) as session:
        async def one(i: int) -> tuple[str, int]:
            async with session.post("/v1/wallets", json={"owner": f"owner-{i % 20}", "currency": "USD"}) as r:
                wallet_id = str((await r.json())["wallet_id"])
            credit = {"amount": SEED, "reference": "seed"}
            async with session.post(f"/v1/wallets/{wallet_id}/credits", json=credit) as r:
                return wallet_id, int((await r.json())["position"])

        seeded = await asyncio.gather(*(one(i) for i in range(count)))
        last = max(position for _, position in seeded)
        async with session.get(f"/v1/wallets/{seeded[0][0]}", params={"min_position": str(last)},
                               headers={"Prefer": "wait=10"}) as reply:
            reply.raise_for_status()
        return [wallet_id for wallet_id, _ in seeded]


# ---------------------------------------------------------------- the load generator (own process)


class Mix:
    """The bench's command mix over one aiohttp session: 30 % debits, 30 % credits, 20 % a reservation
    then its confirm or rollback (one command), 20 % reads. Errors are counted by status and code."""

    def __init__(self, session: aiohttp.ClientSession, wallets: list[str]) -> None:
        self.session = session
        self.wallets = wallets
        self.errors: dict[str, int] = {}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        key = {"Idempotency-Key": uuid.uuid4().hex}
        async with self.session.post(path, json=body, headers=key) as reply:
            data = await reply.json(content_type=None)
            if reply.status >= 300:
                self.error(f"{reply.status} {data.get('code')}")
                return None
            return dict(data)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def one_command(self, rng: random.Random) -> int:
        """One command of the mix; the number of requests it took (a reservation and its close: 2)."""
        wallet = rng.choice(self.wallets)
        roll = rng.random()
        if roll < 0.3:
            await self.post(f"/v1/wallets/{wallet}/debits", {"amount": rng.randint(1, 500), "reference": "d"})
        elif roll < 0.6:
            await self.post(f"/v1/wallets/{wallet}/credits", {"amount": rng.randint(1, 500), "reference": "c"})
        elif roll < 0.8:
            reserved = await self.post(f"/v1/wallets/{wallet}/reservations",
                                       {"amount": rng.randint(1, 500), "ttl_seconds": 300})
            if reserved is not None:
                action = "confirm" if rng.random() < 0.5 else "rollback"
                await self.post(f"/v1/wallets/{wallet}/reservations/{reserved['reservation_id']}/{action}", {})
                return 2
        else:
            async with self.session.get(f"/v1/wallets/{wallet}") as reply:
                await reply.read()
                if reply.status != 200:
                    self.error(str(reply.status))
        return 1


async def drive(base: str, headers: dict[str, str], wallets: list[str], connections: int, seconds: float,
                warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    commands = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as session:
        mix = Mix(session, wallets)
        errors = mix.errors
        started = time.perf_counter()
        measure_from = started + warmup
        stop_at = measure_from + seconds

        async def worker(seed: int) -> None:
            nonlocal commands
            rng = random.Random(seed)
            while (now := time.perf_counter()) < stop_at:
                await mix.one_command(rng)
                if now >= measure_from:
                    latencies.append(time.perf_counter() - now)
                    commands += 1

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker(i) for i in range(connections)))
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.perf_counter() - started
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies.sort()
    return {
        "commands": commands,
        "commands_per_s": commands / seconds,
        **{f"{name}_ms": percentile(latencies, q) * 1000 for name, q in QUANTILES},
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "loadgen_cpu_s": cpu,
        "loadgen_wall_s": elapsed,
        "loadgen": "Python aiohttp client (own process); a reservation and its confirm or rollback are one command",
    }


async def run_wrk(script: str, url: str, connections: int, duration: float,
                  *script_args: str) -> tuple[dict[str, Any], float]:
    """One wrk run (one thread, C connections) with a script that prints "WRK_RESULT {json}" when done:
    that object, and the CPU seconds wrk used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
        "-s", str(ROOT / "scripts" / script), url, "--", *script_args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next((ln for ln in output.decode().splitlines() if ln.startswith("WRK_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk {script} failed (exit {proc.returncode}):\n{output.decode()}")
    return json.loads(line.removeprefix("WRK_RESULT ")), cpu


async def drive_wrk(base: str, token: str, wallets: list[str], connections: int, seconds: float,
                    warmup: float) -> dict[str, Any]:
    """The same mix from wrk (one thread, C connections): a warm-up run, then the measured one."""
    async def run_mix(duration: float) -> tuple[dict[str, Any], float]:
        return await run_wrk("bench_http.lua", base, connections, duration, token, *wallets)

    if warmup:
        await run_mix(warmup)
    result, cpu = await run_mix(seconds)
    wall = result["duration_us"] / 1e6
    errors = result["errors"] + result["socket_errors"]
    kinds = dict(result["error_kinds"])
    if result["socket_errors"]:
        kinds["socket"] = result["socket_errors"]
    return {
        "commands": result["requests"],
        "commands_per_s": result["requests"] / wall,
        **{f"{name}_ms": result[f"{name}_us"] / 1000 for name, _ in QUANTILES},
        "max_ms": result["max_us"] / 1000,
        "errors": errors,
        "error_kinds": kinds,
        "loadgen_cpu_s": cpu,
        "loadgen_wall_s": wall,
        "loadgen": "wrk (1 thread, scripts/bench_http.lua); every request counts as one command",
    }


async def run_bare(connections: int, seconds: float) -> float:
    """Requests/s of the bare aiohttp handler (scripts/bench_http_bare.py) under the same wrk settings."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "bench_http_bare.py"), str(port)])  # noqa: ASYNC220
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the bare aiohttp reference did not start") from None
                await asyncio.sleep(0.05)
        result, _ = await run_wrk("bench_http_bare.lua", f"http://127.0.0.1:{port}", connections, seconds)
        return float(result["requests"] / (result["duration_us"] / 1e6))
    finally:
        proc.terminate()
        proc.wait(30)


def loadgen_process(conn: Any, *args: Any) -> None:
    conn.send(asyncio.run(drive(*args)))
    conn.close()


WORKER_HEADER = "X-Tally-Worker"


async def scrape(base: str, headers: dict[str, str], workers: int = 1) -> dict[str, float]:
    """The server's /metrics as {series: value} (for batch sizes and server-side latency per route).
    With several workers, each answers for itself: a new connection per scrape (the kernel picks the
    worker) until every worker (its X-Tally-Worker header) has answered once; the sum of theirs."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(50 * workers):
        async with aiohttp.ClientSession(base, headers=headers) as session, session.get("/metrics") as reply:
            text = await reply.text()
            worker = reply.headers.get(WORKER_HEADER, "0")
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        seen.setdefault(worker, values)
        if len(seen) == workers:
            break
    else:
        raise RuntimeError(f"only workers {sorted(seen)} of {workers} answered /metrics")
    total: dict[str, float] = {}
    for answer in seen.values():
        for series, number in answer.items():
            total[series] = total.get(series, 0.0) + number
    return total


COUNT_SERIES = "tally_http_request_duration_seconds_count{"
SUM_SERIES = "tally_http_request_duration_seconds_sum{"
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
"""One label of a Prometheus series (name="value"): the latency series carry method, route and status
class, so the route alone names no series."""


def server_view(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server saw during the run: append batching, and its own latency per route."""
    def delta(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    batches, requests = delta("tally_append_batches_total"), delta("tally_append_requests_total")
    fenced, misses = delta("tally_append_fenced_total"), delta("tally_append_fence_misses_total")
    tail_queries = delta("tally_stream_tail_queries_total")
    shifted, conflicts = delta("tally_append_fenced_shifted_total"), delta("tally_command_conflicts_total")
    locked = {series.partition('"')[2].rpartition('"')[0]: int(delta(series)) for series in after
              if series.startswith("tally_append_locked_total{") and delta(series)}
    routes: dict[str, tuple[int, float]] = {}
    for series in after:
        if series.startswith(COUNT_SERIES):
            labels = dict(LABEL.findall(series[len(COUNT_SERIES):]))
            route = f"{labels.get('method', '')} {labels.get('route', '')} {labels.get('status_class', '')}".strip()
            count = delta(series)
            total = delta(SUM_SERIES + series[len(COUNT_SERIES):])  # the same labels, in the same order
            if count:
                routes[route] = (int(count), total / count * 1000)
    return {"append_batches": int(batches), "requests_per_batch": requests / batches if batches else 0.0,
            "locked_fraction": sum(locked.values()) / batches if batches else 0.0,
            "wholly_locked_fraction": (batches - fenced) / batches if batches else 0.0,
            "fence_misses_per_batch": misses / batches if batches else 0.0,
            "shifted_fraction": shifted / fenced if fenced else 0.0,
            "conflicts_per_append": conflicts / requests if requests else 0.0,
            "tail_queries_per_append": tail_queries / requests if requests else 0.0,
            "locked_reasons": locked, "routes": routes, "event_loop": event_loop_of(after)}


def slow_batches(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Append transactions that took over 50 ms and over 100 ms between two scrapes. With 64 connections
    each one holds every in-flight command, so two or three of them in a round decide its p99."""
    name = "tally_append_batch_duration_seconds"

    def over(bound: str) -> int:
        within = f'{name}_bucket{{le="{bound}"}}'
        total = f"{name}_count"
        return int((after.get(total, 0) - before.get(total, 0)) - (after.get(within, 0) - before.get(within, 0)))

    return {"over_50ms": over("0.05"), "over_100ms": over("0.1")}


def event_loop_of(metrics: dict[str, float]) -> str:
    """The server's event loop (uvloop or asyncio), from its scraped /metrics."""
    return next((series.partition('loop="')[2].partition('"')[0] for series in metrics
                 if series.startswith("tally_event_loop_info{")), "unknown")


def use_wrk(choice: str) -> bool:
    found = shutil.which("wrk") is not None
    if choice == "wrk" and not found:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    return choice == "wrk" or (choice == "auto" and found)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_by_process(processes: list[psutil.Process]) -> dict[int, float]:
    found = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
            found[proc.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return found


def cpu_used(before: dict[int, float], processes: list[psutil.Process]) -> float:
    """CPU seconds used since `before` by `processes`, listed again at the end: one listed in `before`
    counts its difference, any other all of its own (it started during the round: a backend that a pool
    opened under load, a worker still starting). Not told apart by create_time: psutil's can be up to a
    second early, which dropped the backends a fresh server opened in its first second. One that exited
    meanwhile takes its total with it (counting it would make the share negative)."""
    after = cpu_by_process(processes)
    return sum(max(0.0, total - before[pid]) if pid in before else total  # a reused pid: 0
               for pid, total in after.items())


def postgres_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in ("postgres", "postgres:")]


async def drive_round(base: str, token: str, headers: dict[str, str], wallets: list[str], args: argparse.Namespace,
                      seconds: float, warmup: float) -> dict[str, Any]:
    """One measured round of the mix, from wrk or from the Python load generator's own process."""
    if use_wrk(args.loadgen):
        return await drive_wrk(base, token, wallets, args.connections, seconds, warmup)
    parent, child = multiprocessing.Pipe()
    loadgen = multiprocessing.get_context("spawn").Process(
        target=loadgen_process, args=(child, base, headers, wallets, args.connections, seconds, warmup))
    loadgen.start()
    result: dict[str, Any] = await asyncio.to_thread(parent.recv)
    loadgen.join()
    return result


def worker_counts(value: str) -> list[int]:
    try:
        counts = [int(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma separated list of worker counts: {value!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"worker counts must be distinct and at least 1: {value!r}")
    return counts


def start_serve(dsn: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """`serve` (with --workers N when N > 1) on a fresh port: the process and its base URL."""
    port = free_port()
    command = [sys.executable, "-m", "backend", "serve"] + (["--workers", str(workers)] if workers > 1 else [])
    proc = subprocess.Popen(command, cwd=ROOT, env=serve_env(dsn, port))
    return proc, f"http://127.0.0.1:{port}"


def server_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The server and, with --workers, its workers."""
    parent = psutil.Process(proc.pid)
    return [parent, *parent.children(recursive=True)]


async def measure(server: Server, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Rounds of Tally (once per worker count) then the bare reference (A B A B: the machine's speed
    drifts), all on one database: the median round of each worker count."""
    rounds = 1 if args.quick else args.rounds
    seconds = 8.0 if args.quick else args.seconds / rounds
    warmup = 2.0 if args.quick else 3.0
    async with fresh_database(server, "http") as dsn:
        token = await admin_token(dsn)
        headers = {"Authorization": f"Bearer {token}"}
        wallets: list[str] = []
        results: dict[int, list[dict[str, Any]]] = {count: [] for count in args.workers}
        views: dict[int, dict[str, Any]] = {}
        for _ in range(rounds):
            for count in args.workers:
                proc, base = start_serve(dsn, count)
                try:
                    await wait_ready(base, proc)
                    if not wallets:
                        wallets = await seed_wallets(base, headers, args.wallets)
                    served, pg = server_processes(proc), postgres_processes()
                    round_before = await scrape(base, headers, count)
                    server_cpu0, pg_cpu0, t0 = cpu_by_process(served), cpu_by_process(pg), time.perf_counter()
                    result = await drive_round(base, token, headers, wallets, args, seconds, warmup)
                    wall = time.perf_counter() - t0
                    round_after = await scrape(base, headers, count)
                    result["slow_batches"] = slow_batches(round_before, round_after)
                    result["server_cpu_share"] = cpu_used(server_cpu0, server_processes(proc)) / wall
                    result["postgres_cpu_share"] = cpu_used(pg_cpu0, postgres_processes()) / wall
                    result["loadgen_cpu_share"] = result["loadgen_cpu_s"] / result["loadgen_wall_s"]
                    views[count] = server_view(round_before, round_after)
                finally:
                    proc.terminate()
                    proc.wait(60)
                if use_wrk(args.loadgen) and count == args.workers[-1]:
                    result["bare_requests_per_s"] = await run_bare(args.connections, 3.0 if args.quick else 5.0)
                results[count].append(result)
        measured = {}
        for count, runs in results.items():
            median = sorted(runs, key=lambda r: r["commands_per_s"])[len(runs) // 2]
            bares = sorted(r["bare_requests_per_s"] for r in runs if "bare_requests_per_s" in r)
            measured[count] = {**median, "rounds": runs, "bare_median": bares[len(bares) // 2] if bares else None,
                               "server": views[count]}
        return measured


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with chosen_server(args.dsn) as server:
        measured = await measure(server, args)
    first = measured[args.workers[0]]
    print(f"server: {server.description}; event loop {first['server']['event_loop']} (EVENT_LOOP: "
          f"{os.environ.get('EVENT_LOOP', 'auto')}); {args.connections} connections, {args.wallets} wallets")
    print(f"load generator: {first['loadgen']}")
    per_count = []
    for count, result in measured.items():
        per_count.append(report(args, count, result))
    if len(per_count) > 1:
        base = per_count[0]["commands_per_s"]
        for entry in per_count[1:]:
            print(f"workers {entry['workers']}: {entry['commands_per_s'] / base:.2f}x the commands/s of "
                  f"workers {per_count[0]['workers']} (same run, alternating rounds)")
    return {"bench": "http", **{key: value for key, value in per_count[0].items() if key != "workers"},
            "workers": per_count}


def report(args: argparse.Namespace, count: int, result: dict[str, Any]) -> dict[str, Any]:
    """Print one worker count's rounds and median; its JSON entry."""
    print(f"workers {count}:")
    for i, r in enumerate(result["rounds"], 1):
        bare_text = f"; bare aiohttp {r['bare_requests_per_s']:.0f} requests/s" if "bare_requests_per_s" in r else ""
        print(f"  round {i}: {r['commands_per_s']:.0f} commands/s, p50 {r['p50_ms']:.1f} ms, p90 {r['p90_ms']:.1f}, "
              f"p99 {r['p99_ms']:.1f}, p99.9 {r['p999_ms']:.1f}, max {r['max_ms']:.1f} ms, "
              f"server CPU {r['server_cpu_share'] / r['commands_per_s'] * 1e6:.0f} us per command; "
              f"appends over 50 ms {r['slow_batches']['over_50ms']} (over 100 ms {r['slow_batches']['over_100ms']})"
              f"{bare_text}")
    errors = sum(r["errors"] for r in result["rounds"])
    print(f"  median round: commands/s {result['commands_per_s']:.0f}   p50 {result['p50_ms']:.1f} ms   "
          f"p99 {result['p99_ms']:.1f} ms   errors {errors} {result['error_kinds'] or ''}")
    print(f"  closed loop: {args.connections} connections at {result['commands_per_s']:.0f} commands/s keep each "
          f"request {args.connections / result['commands_per_s'] * 1000:.1f} ms on average (Little's law), "
          "whatever the server does; only the spread around that mean is the server's to narrow")
    print(f"  CPU (cores busy): server {result['server_cpu_share']:.2f} (all its processes), postgres "
          f"{result['postgres_cpu_share']:.2f}, load generator {result['loadgen_cpu_share']:.2f} (of "
          f"{os.cpu_count()}; other programs on the machine take the rest)")
    view = result["server"]
    print(f"  server side (last round, {count} worker(s) summed): {view['append_batches']} append batches, "
          f"{view['requests_per_batch']:.1f} appends each; {view['locked_fraction']:.1%} of them ran a locked "
          f"transaction {view['locked_reasons'] or ''} ({view['wholly_locked_fraction']:.1%} for all their "
          f"appends), {view['fence_misses_per_batch']:.2f} fence misses per batch, {view['shifted_fraction']:.1%} "
          f"of the fenced ones went in further on than planned (another worker had appended elsewhere), "
          f"{view['conflicts_per_append']:.3f} lost races (decided again) and "
          f"{view['tail_queries_per_append']:.2f} stream reads per append; mean latency per route "
          "(warm-up included):")
    for route, (n, mean_ms) in sorted(view["routes"].items(), key=lambda item: -item[1][0]):
        print(f"    {n:>7}  {mean_ms:7.1f} ms  {route}")
    bare = result["bare_median"]
    if bare:
        print(f"  scale reference, same run: a bare aiohttp handler (scripts/bench_http_bare.py) answers {bare:.0f} "
              f"requests/s (median) under the same wrk settings; Tally's commands/s are "
              f"{result['commands_per_s'] / bare:.1%} of that")
    target = result["commands_per_s"] >= 2000 and result["p99_ms"] <= 50 and errors == 0
    print(f"  target >= 2,000 commands/s, p99 <= 50 ms, 0 errors: {'met' if target else 'NOT met'}")
    return {"workers": count, "commands_per_s": round(result["commands_per_s"], 1),
            "p50_ms": round(result["p50_ms"], 2), "p99_ms": round(result["p99_ms"], 2),
            "locked_fraction": round(view["locked_fraction"], 4),
            "fence_misses_per_batch": round(view["fence_misses_per_batch"], 4),
            "tail_queries_per_append": round(view["tail_queries_per_append"], 4),
            "server_cpu_share": round(result["server_cpu_share"], 3),
            "postgres_cpu_share": round(result["postgres_cpu_share"], 3),
            "loadgen_cpu_share": round(result["loadgen_cpu_share"], 3),
            "errors": errors, "bare_aiohttp_requests_per_s": round(bare, 1) if bare else None}
