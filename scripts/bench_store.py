"""Append throughput and latency: Tally's store vs the eventsourcing library's PostgreSQL persistence vs a ceiling.

Workload: W wallet streams (empty at the start); a command picks a wallet at random, reads its version and
appends one small event with optimistic concurrency, re-reading and retrying on a conflict (counted as a
retry). Every implementation x client count runs in a fresh database on the same server: warm-up, ANALYZE,
then a fixed-duration measurement. Implementations alternate (tally, eventsourcing, ceiling, tally, ...)
and each round repeats them all; the report shows medians over rounds.

- tally: C asyncio tasks sharing one EventStore and one asyncpg pool (C+2 connections, capped).
- eventsourcing: the library's own `eventsourcing.postgres` persistence, C threads each doing
  repository.get -> wallet.deposit -> app.save, retrying on IntegrityError.
- ceiling: raw asyncpg against a plain table of the events table's shape (same columns and indexes, no
  triggers, no hash chain, identity positions with no ordering guarantee). A command is
  `select max(version)` for its stream (autocommit, like Tally's stream_version read), then ONE INSERT as
  its own transaction; a unique (stream_id, version) violation is the conflict.
  Its pool is asyncpg's default (whose reset costs a round trip per release); `--ceiling-pool tally`
  gives it Tally's pool options instead (see backend.db.keep_session).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import statistics
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg
from bench_observe import observing
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError

from backend.db import init_connection, mask_dsn, pool_options
from backend.store.event_store import EventStore
from backend.store.events import NewEvent, WrongExpectedVersion
from backend.store.migrate import migrate

IMPLS = ("tally", "eventsourcing", "ceiling")
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / ".data" / "bench-pg"
POOL_CAP = 48
"""Most connections one implementation may hold (the server's max_connections is usually 100)."""
DEPOSIT = {"amount": 5}

CEILING_DDL = """
create table events (
    position    bigint generated always as identity primary key,
    stream_id   text not null,
    version     int not null,
    type        text not null,
    data        jsonb not null,
    metadata    jsonb not null default '{}'::jsonb,
    event_id    uuid not null unique,
    recorded_at timestamptz not null,
    hash        bytea not null,
    unique (stream_id, version)
);
create index events_type_position on events (type, position);
create index events_recorded_at on events (recorded_at);
"""
CEILING_VERSION_SQL = "select coalesce(max(version), 0) from events where stream_id = $1"
CEILING_INSERT_SQL = """
insert into events (stream_id, version, type, data, event_id, recorded_at, hash) values ($1, $2, $3, $4, $5, $6, $7)
"""
CEILING_HASH = bytes(32)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="admin DSN of the server (default: $BENCH_DATABASE_URL, local 5432, embedded)")
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts (default 1,8,32)")
    parser.add_argument("--seconds", type=float, help="measurement per implementation x clients (default 5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each measurement (default 1)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating implementations (default 2)")
    parser.add_argument("--wallets", type=int, default=1000, help="wallet streams (default 1000)")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--quick", action="store_true", help="1.5 s phases, 1 round: under a minute in all")
    parser.add_argument("--observe", action="store_true",
                        help="tally phases: sample pg_stat_activity wait events and client/backend CPU (bench_observe)")
    parser.add_argument("--ceiling-pool", choices=("asyncpg", "tally"), default="asyncpg",
                        help="the ceiling's pool: asyncpg's defaults (default) or Tally's (no reset round trip)")


@dataclass(frozen=True)
class Plan:
    impls: tuple[str, ...]
    clients: tuple[int, ...]
    seconds: float
    warmup: float
    rounds: int
    wallets: int
    ceiling_pool: str = "asyncpg"
    observe: bool = False


def make_plan(args: argparse.Namespace) -> Plan:
    impls = tuple(name.strip() for name in args.impls.split(",") if name.strip())
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown implementation(s): {', '.join(sorted(unknown))}")
    return Plan(
        impls=impls,
        clients=tuple(int(c) for c in args.clients.split(",")),
        seconds=args.seconds or (1.5 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        rounds=args.rounds or (1 if args.quick else 2),
        wallets=args.wallets,
        ceiling_pool=args.ceiling_pool,
        observe=args.observe,
    )


# ---------------------------------------------------------------- measurement


@dataclass
class Stats:
    """What one client (or all of them, merged) did during a measurement."""

    latencies: list[float] = field(default_factory=list)
    retries: int = 0
    elapsed: float = 0.0

    def merge(self, other: Stats) -> None:
        self.latencies.extend(other.latencies)
        self.retries += other.retries


@dataclass(frozen=True)
class Sample:
    """One measurement phase: one implementation at one client count in one round."""

    impl: str
    clients: int
    events_per_s: float
    p50_ms: float
    p99_ms: float
    retries: int
    batch_size: float | None = None


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-q * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarise(impl: str, clients: int, stats: Stats, batch_size: float | None = None) -> Sample:
    ordered = sorted(stats.latencies)
    return Sample(
        impl=impl,
        clients=clients,
        events_per_s=len(ordered) / stats.elapsed if stats.elapsed else 0.0,
        p50_ms=percentile(ordered, 0.50) * 1000,
        p99_ms=percentile(ordered, 0.99) * 1000,
        retries=stats.retries,
        batch_size=batch_size,
    )


AsyncCommand = Callable[[str], Awaitable[int]]
"""Run one command against a stream; return how many retries it needed."""
SyncCommand = Callable[[int], int]
"""Run one command against wallet number n (thread clients); return how many retries it needed."""


async def drive_tasks(command: AsyncCommand, clients: int, seconds: float, wallets: int) -> Stats:
    """C asyncio tasks issue commands back to back until the deadline."""
    deadline = time.perf_counter() + seconds

    async def client(seed: int) -> Stats:
        rng, stats = random.Random(seed), Stats()
        while time.perf_counter() < deadline:
            stream = f"wallet-{rng.randrange(wallets)}"
            started = time.perf_counter()
            stats.retries += await command(stream)
            stats.latencies.append(time.perf_counter() - started)
        return stats

    started = time.perf_counter()
    per_client = await asyncio.gather(*(client(secrets.randbits(32)) for _ in range(clients)))
    total = Stats(elapsed=time.perf_counter() - started)
    for stats in per_client:
        total.merge(stats)
    return total


def drive_threads(command: SyncCommand, clients: int, seconds: float, wallets: int) -> Stats:
    """C threads issue commands back to back until the deadline (blocking; call it via asyncio.to_thread)."""
    deadline = time.perf_counter() + seconds
    per_client = [Stats() for _ in range(clients)]

    def client(stats: Stats, seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            wallet = rng.randrange(wallets)
            started = time.perf_counter()
            stats.retries += command(wallet)
            stats.latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(s, secrets.randbits(32))) for s in per_client]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Stats(elapsed=time.perf_counter() - started)
    for stats in per_client:
        total.merge(stats)
    return total


# ---------------------------------------------------------------- servers and databases


@dataclass
class Server:
    admin_dsn: str
    description: str
    stop: Callable[[], None] | None = None


async def answers(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def choose_server(dsn: str | None) -> Server:
    """--dsn, else $BENCH_DATABASE_URL, else a local PostgreSQL on 5432, else Tally's embedded server."""
    if dsn:
        return Server(dsn, "--dsn")
    if os.environ.get("BENCH_DATABASE_URL"):
        return Server(os.environ["BENCH_DATABASE_URL"], "$BENCH_DATABASE_URL")
    if await answers(LOCAL_DSN):
        return Server(LOCAL_DSN, "local PostgreSQL on 127.0.0.1:5432")
    from backend.embedded_pg import start_embedded

    embedded = await asyncio.to_thread(start_embedded, EMBEDDED_DIR)
    return Server(embedded.dsn("postgres"), f"embedded PostgreSQL in {EMBEDDED_DIR}", stop=embedded.stop)


@asynccontextmanager
async def chosen_server(dsn: str | None) -> AsyncIterator[Server]:
    """choose_server's server for the length of a run: an embedded one started for it stops after it."""
    server = await choose_server(dsn)
    try:
        yield server
    finally:
        if server.stop is not None:
            server.stop()


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """One connection to dsn for the block (the benches' one-off statements), closed afterwards."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database(server: Server, impl: str) -> AsyncIterator[str]:
    """Create bench_<impl>_<random>, yield its DSN, drop it afterwards."""
    name = f"bench_{impl}_{secrets.token_hex(4)}"
    async with connected(server.admin_dsn) as admin:
        await admin.execute(f'create database "{name}"')
        try:
            yield with_database(server.admin_dsn, name)
        finally:
            await admin.execute(f'drop database if exists "{name}" with (force)')


async def analyze(dsn: str) -> None:
    """Fresh tables have no statistics; without them the planner may pick a seq scan mid-run."""
    async with connected(dsn) as conn:
        await conn.execute("analyze")


async def migrated(dsn: str) -> None:
    """Apply the migrations to the database behind dsn."""
    async with connected(dsn) as conn:
        await migrate(conn)


def pool_size(clients: int) -> int:
    return min(clients + 2, POOL_CAP)


async def open_pool(dsn: str, clients: int, **options: Any) -> asyncpg.Pool:
    size = pool_size(clients)
    pool = await asyncpg.create_pool(dsn, min_size=size, max_size=size, **options)
    assert pool is not None
    return pool


# ---------------------------------------------------------------- the three implementations


async def measure_tally(dsn: str, clients: int, plan: Plan) -> Sample:
    await migrated(dsn)
    pool = await open_pool(dsn, clients, **pool_options())
    store = EventStore(pool)

    async def command(stream: str) -> int:
        retries = 0
        while True:
            version = await store.stream_version(stream)
            try:
                await store.append_to(stream, version, [NewEvent("Deposited", DEPOSIT)])
            except WrongExpectedVersion:
                retries += 1
            else:
                return retries

    try:
        await drive_tasks(command, clients, plan.warmup, plan.wallets)
        await analyze(dsn)
        before = store.counters()
        async with observing(dsn) if plan.observe else contextlib.nullcontext() as observation:
            stats = await drive_tasks(command, clients, plan.seconds, plan.wallets)
        counters = store.counters()
        batches, requests = counters.batches - before.batches, counters.batched_requests - before.batched_requests
        if observation is not None:
            fenced = counters.fenced - before.fenced
            print(f"  observed tally {clients}: {observation.describe()}; {fenced} of {batches} batches on the "
                  "fenced one-round-trip path", file=sys.stderr, flush=True)
    finally:
        await store.close()
        await pool.close()
    return summarise("tally", clients, stats, requests / batches if batches else None)


async def measure_ceiling(dsn: str, clients: int, plan: Plan) -> Sample:
    # asyncpg's default pool (its reset costs a round trip per release), unless --ceiling-pool tally.
    options: dict[str, Any] = {"init": init_connection}
    if plan.ceiling_pool == "tally":
        options = pool_options()
    pool = await open_pool(dsn, clients, **options)

    async def command(stream: str) -> int:
        retries = 0
        while True:
            version = await pool.fetchval(CEILING_VERSION_SQL, stream)
            try:
                await pool.execute(
                    CEILING_INSERT_SQL,
                    stream,
                    version + 1,
                    "Deposited",
                    DEPOSIT,
                    uuid.uuid4(),
                    datetime.now(UTC),
                    CEILING_HASH,
                )
            except asyncpg.UniqueViolationError:
                retries += 1
            else:
                return retries

    try:
        await pool.execute(CEILING_DDL)
        await drive_tasks(command, clients, plan.warmup, plan.wallets)
        await analyze(dsn)
        stats = await drive_tasks(command, clients, plan.seconds, plan.wallets)
    finally:
        await pool.close()
    return summarise("ceiling", clients, stats)


class Wallet(Aggregate):
    """The eventsourcing peer's aggregate: a balance that deposits raise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.balance = 0

    @staticmethod
    def create_id(name: str) -> uuid.UUID:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"/wallets/{name}")

    @event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


class Wallets(Application[uuid.UUID]):
    """The eventsourcing peer's application (its events table is `wallets_events`)."""


def eventsourcing_env(dsn: str, clients: int) -> dict[str, str]:
    """PERSISTENCE_MODULE and POSTGRES_* for a DSN; a Unix-socket DSN's host is the socket directory."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(query.get("port", [parts.port or 5432])[0]),
        "POSTGRES_USER": unquote(parts.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(parts.password or ""),
        "POSTGRES_POOL_SIZE": str(pool_size(clients)),
        "POSTGRES_MAX_OVERFLOW": "0",
    }


async def measure_eventsourcing(dsn: str, clients: int, plan: Plan) -> Sample:
    app = await asyncio.to_thread(Wallets, eventsourcing_env(dsn, clients))
    names = [f"wallet-{n}" for n in range(plan.wallets)]
    ids = [Wallet.create_id(name) for name in names]

    def command(n: int) -> int:
        retries = 0
        while True:
            wallet: Wallet
            try:
                wallet = app.repository.get(ids[n])
            except AggregateNotFoundError:
                wallet = Wallet(names[n])
            wallet.deposit(DEPOSIT["amount"])
            try:
                app.save(wallet)
            except IntegrityError:
                retries += 1
            else:
                return retries

    try:
        await asyncio.to_thread(drive_threads, command, clients, plan.warmup, plan.wallets)
        await analyze(dsn)
        stats = await asyncio.to_thread(drive_threads, command, clients, plan.seconds, plan.wallets)
    finally:
        await asyncio.to_thread(app.close)
    return summarise("eventsourcing", clients, stats)


MEASURES: dict[str, Callable[[str, int, Plan], Awaitable[Sample]]] = {
    "tally": measure_tally,
    "eventsourcing": measure_eventsourcing,
    "ceiling": measure_ceiling,
}


# ---------------------------------------------------------------- report


def median_samples(samples: list[Sample]) -> Sample:
    """Per-metric medians over the rounds of one implementation x client count."""
    batch_sizes = [s.batch_size for s in samples if s.batch_size is not None]
    return Sample(
        impl=samples[0].impl,
        clients=samples[0].clients,
        events_per_s=statistics.median(s.events_per_s for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        retries=round(statistics.median(s.retries for s in samples)),
        batch_size=statistics.median(batch_sizes) if batch_sizes else None,
    )


def format_row(sample: Sample, rounds: str = "") -> str:
    batch = f"{sample.batch_size:10.1f}" if sample.batch_size is not None else f"{'-':>10}"
    return (
        f"{sample.impl:<14}{sample.clients:>7}{sample.events_per_s:>11.0f}{sample.p50_ms:>9.2f}"
        f"{sample.p99_ms:>9.2f}{sample.retries:>9}{batch}  {rounds}"
    )


def format_table(medians: list[Sample], samples: list[Sample]) -> str:
    header = (
        f"{'impl':<14}{'clients':>7}{'events/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'retries':>9}{'avg batch':>10}"
        "  events/s by round"
    )
    lines = [header, "-" * len(header)]
    for median in medians:
        per_round = [s for s in samples if (s.impl, s.clients) == (median.impl, median.clients)]
        lines.append(format_row(median, " ".join(f"{s.events_per_s:.0f}" for s in per_round)))
    return "\n".join(lines)


def format_targets(medians: list[Sample]) -> list[str]:
    """The store's targets (docs/PERFORMANCE.md), where the run measured what they compare."""
    by_key = {(s.impl, s.clients): s for s in medians}
    lines = []
    top = max(s.clients for s in medians)
    tally, peer, ceiling = (by_key.get((impl, top)) for impl in IMPLS)
    if tally and peer:
        ratio = tally.events_per_s / peer.events_per_s
        lines.append(f"{top} clients: tally/eventsourcing events/s = {ratio:.1f}x (target >= 10x)")
    if tally and ceiling:
        ratio = tally.events_per_s / ceiling.events_per_s
        lines.append(f"{top} clients: tally/ceiling events/s = {ratio:.2f}x (target >= 1.0x)")
    one, one_ceiling = by_key.get(("tally", 1)), by_key.get(("ceiling", 1))
    if one and one_ceiling:
        ratio = one.p50_ms / one_ceiling.p50_ms
        lines.append(f"1 client: tally/ceiling p50 = {ratio:.2f}x (target <= 1.5x)")
    return lines


def to_json(medians: list[Sample]) -> dict[str, Any]:
    return {
        "bench": "store",
        "results": [
            {
                "impl": s.impl,
                "clients": s.clients,
                "events_per_s": round(s.events_per_s, 1),
                "p50_ms": round(s.p50_ms, 3),
                "p99_ms": round(s.p99_ms, 3),
            }
            for s in medians
        ],
    }


# ---------------------------------------------------------------- run


async def describe_server(server: Server) -> str:
    async with connected(server.admin_dsn) as conn:
        version = await conn.fetchval("select version()")
        settings = await conn.fetch(
            "select name, setting from pg_settings where name = any($1::text[]) order by name",
            ["fsync", "max_connections", "shared_buffers", "synchronous_commit"],
        )
    shown = ", ".join(f"{r['name']}={r['setting']}" for r in settings)
    return f"server: {server.description} ({mask_dsn(server.admin_dsn)})\n{version}\n{shown}\n{describe_host()}"


def describe_host() -> str:
    """Clients and server share these CPUs; a busy host skews results, so say how busy it was."""
    return f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (1 min)"


async def run_rounds(server: Server, plan: Plan) -> list[Sample]:
    """Round after round, every client count, implementations alternating; each phase in a fresh database."""
    samples = []
    for round_no in range(1, plan.rounds + 1):
        for clients in plan.clients:
            for impl in plan.impls:
                async with fresh_database(server, impl) as dsn:
                    sample = await MEASURES[impl](dsn, clients, plan)
                samples.append(sample)
                print(f"  round {round_no} {format_row(sample)}", file=sys.stderr, flush=True)
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    async with chosen_server(args.dsn) as server:
        print(await describe_server(server), flush=True)
        print(
            f"workload: {plan.wallets} wallets, clients {','.join(map(str, plan.clients))}, {plan.warmup:g} s warm-up"
            f" + {plan.seconds:g} s per phase, {plan.rounds} round(s); medians below",
            flush=True,
        )
        samples = await run_rounds(server, plan)
    medians = [
        median_samples([s for s in samples if (s.impl, s.clients) == (impl, clients)])
        for clients in plan.clients
        for impl in plan.impls
    ]
    print(format_table(medians, samples))
    print(f"after the run: {describe_host()}")
    for line in format_targets(medians):
        print(line)
    return to_json(medians)
