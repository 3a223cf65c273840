"""Replay: rebuild every projection from N events of the command mix vs the eventsourcing library's
ProjectionRunner over the same events; plus the live lag (commit -> read model) at 1,000 commands/s.

- Log: the command mix (credits, debits, locks, settlements, reservations that get confirmed, rolled
  back or expire, deposits through confirmation, a few API keys) run against the real domain
  aggregates on a simulated clock; their events are appended with the real EventStore, thousands per
  append. The same events, in the same order, go to the peer's own store (one library aggregate per
  Tally stream, each event keeping its Tally type and data).
- tally: `projections.rebuild` of all six projections (balances, reservations, deposits, api_keys,
  stats, expiry) into fresh tables, swapped in at the end; timed from start to swap.
- eventsourcing: the library's `ProjectionRunner` (POSTGRES persistence) with a tracking-recorder view
  that keeps an equivalent balances table (owner, currency, balance, locked, reserved, version),
  from an empty view until it has tracked the last event.
- lag: a fresh database, one process running every projection (as `serve` does), commands through
  the CommandBus at a fixed rate; lag = when the projection's checkpoint passed the command's position
  minus when the command's append returned.

Rounds alternate tally, eventsourcing, tally, ...; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid4, uuid5

import asyncpg
from bench_store import (
    Server,
    chosen_server,
    connected,
    describe_server,
    eventsourcing_env,
    fresh_database,
    migrated,
    percentile,
)
from eventsourcing.application import Application
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection as LibraryProjection
from eventsourcing.projection import ProjectionRunner
from psycopg.sql import SQL, Identifier

from backend.commands import wallets as wallet_commands
from backend.commands.bus import CommandBus
from backend.commands.context import SYSTEM, CommandContext
from backend.config import Settings
from backend.db import connect_kwargs, init_connection
from backend.domain import ApiKey, Deposit, DomainError, Wallet, derive_address, hash_secret
from backend.domain.registry import wallet_stream
from backend.store.event_store import EventStore
from backend.store.events import RecordedEvent, Write
from backend.store.listener import Listener
from backend.store.repository import Repository
from projections import registry
from projections.rebuild import rebuild
from projections.service import ProjectionService, connector
from projections.waiting import CheckpointWatcher

CURRENCIES = ("USD", "EUR", "BTC", "ETH")
OWNERS = tuple(f"owner-{n}" for n in range(50))
SECRET = b"bench deposit address secret"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="admin DSN of the server (default: $BENCH_DATABASE_URL, local 5432, embedded)")
    parser.add_argument("--events", type=int, help="events in the log (default 200000; --quick 30000)")
    parser.add_argument("--wallets", type=int, default=2000, help="wallets in the mix (default 2000)")
    parser.add_argument("--rounds", type=int, help="rounds of tally/eventsourcing (default 2; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=20_000, help="rebuild batch size (default 20000)")
    parser.add_argument("--lag-rate", type=float, default=1000.0, help="commands/s for the lag run (default 1000)")
    parser.add_argument("--lag-seconds", type=float, help="length of the lag run (default 10; --quick 3)")
    parser.add_argument("--no-peer", action="store_true", help="skip the eventsourcing peer")
    parser.add_argument("--no-lag", action="store_true", help="skip the lag run")
    parser.add_argument("--quick", action="store_true", help="fewer events, one round, short lag run: under a minute")


@dataclass(frozen=True)
class Plan:
    events: int
    wallets: int
    rounds: int
    batch_size: int
    lag_rate: float
    lag_seconds: float
    peer: bool
    lag: bool


def make_plan(args: argparse.Namespace) -> Plan:
    return Plan(
        events=args.events or (30_000 if args.quick else 200_000),
        wallets=args.wallets,
        rounds=args.rounds or (1 if args.quick else 2),
        batch_size=args.batch_size,
        lag_rate=args.lag_rate,
        lag_seconds=args.lag_seconds or (3.0 if args.quick else 10.0),
        peer=not args.no_peer,
        lag=not args.no_lag,
    )


def bench_settings(dsn: str) -> Settings:
    return Settings(database_url=dsn, statement_timeout_ms=0, log_format="text", rate_limit_per_s=0)


# ---------------------------------------------------------------- the command mix


@dataclass
class Mix:
    """The command mix against in-memory aggregates on a simulated clock (5 ms per command)."""

    rng: random.Random
    wallet_count: int
    now: datetime = field(default_factory=lambda: datetime(2030, 1, 1, tzinfo=UTC))
    wallets: list[Wallet] = field(default_factory=list)
    by_currency: dict[str, list[Wallet]] = field(default_factory=dict)
    locks: list[tuple[Wallet, UUID]] = field(default_factory=list)
    reservations: list[tuple[Wallet, UUID]] = field(default_factory=list)
    deposits: list[tuple[Deposit, Wallet]] = field(default_factory=list)

    def command(self) -> list[Aggregate]:
        """Run one command; return the aggregates it changed (empty if the domain refused it)."""
        self.now += timedelta(milliseconds=5)
        if len(self.wallets) < self.wallet_count and (len(self.wallets) < 10 or self.rng.random() < 0.2):
            return [self._open()]
        roll = self.rng.random()
        try:
            for threshold, command in self._choices():
                if roll < threshold:
                    return command()
        except DomainError:
            return []
        return []

    def _choices(self) -> Iterator[tuple[float, Callable[[], list[Aggregate]]]]:
        yield 0.30, self._credit
        yield 0.45, self._debit
        yield 0.55, self._lock
        yield 0.62, lambda: self._close_one(self.locks, self._close_lock)
        yield 0.80, self._reserve
        yield 0.92, lambda: self._close_one(self.reservations, self._close_reservation)
        yield 0.99, self._deposit
        yield 1.00, self._api_key

    def _wallet(self) -> Wallet:
        return self.rng.choice(self.wallets)

    def _open(self) -> Wallet:
        wallet = Wallet.open(uuid4(), self.rng.choice(OWNERS), self.rng.choice(CURRENCIES), self.now)
        self.wallets.append(wallet)
        self.by_currency.setdefault(wallet.currency, []).append(wallet)
        return wallet

    def _credit(self) -> list[Aggregate]:
        wallet = self._wallet()
        wallet.credit(self.rng.randint(100, 100_000), "top-up", self.now)
        return [wallet]

    def _debit(self) -> list[Aggregate]:
        wallet = self._wallet()
        wallet.debit(self.rng.randint(1, 20_000), "purchase", self.now)
        return [wallet]

    def _lock(self) -> list[Aggregate]:
        wallet, lock_id = self._wallet(), uuid4()
        wallet.lock(lock_id, self.rng.randint(1, 10_000), "escrow", self.now)
        self.locks.append((wallet, lock_id))
        return [wallet]

    def _close_one(self, opened: list[tuple[Wallet, UUID]],
                   close: Callable[[Wallet, UUID], list[Aggregate]]) -> list[Aggregate]:
        """Close a random one of the open locks or reservations (none open: nothing to do)."""
        if not opened:
            return []
        wallet, item = opened.pop(self.rng.randrange(len(opened)))
        return close(wallet, item)

    def _close_lock(self, wallet: Wallet, lock_id: UUID) -> list[Aggregate]:
        payee = self.rng.choice(self.by_currency[wallet.currency])
        if payee is wallet or self.rng.random() < 0.5:
            wallet.release(lock_id, self.now)
            return [wallet]
        wallet.settle(lock_id, payee, self.now)
        return [wallet, payee]

    def _reserve(self) -> list[Aggregate]:
        wallet, reservation_id = self._wallet(), uuid4()
        ttl = timedelta(seconds=self.rng.choice((1, 5, 60)))  # simulated seconds: many expire on the way
        wallet.reserve(reservation_id, self.rng.randint(1, 10_000), self.now + ttl, self.now)
        self.reservations.append((wallet, reservation_id))
        return [wallet]

    def _close_reservation(self, wallet: Wallet, reservation_id: UUID) -> list[Aggregate]:
        if wallet.reservation_state(reservation_id, self.now) != "open":
            return []
        if self.rng.random() < 0.6:
            wallet.confirm(reservation_id, self.now, self.rng.choice((None, 1)))
        else:
            wallet.rollback(reservation_id, self.now)
        return [wallet]

    def _deposit(self) -> list[Aggregate]:
        """Open a deposit, or move an open one along: confirming, then confirmed (crediting its wallet)."""
        if self.deposits and self.rng.random() < 0.6:
            deposit, wallet = self.deposits.pop(self.rng.randrange(len(self.deposits)))
            if deposit.status == "pending":
                deposit.mark_confirming(1, self.now)
                self.deposits.append((deposit, wallet))
                return [deposit]
            amount, tx = self.rng.randint(1_000, 500_000), f"tx-{uuid4().hex}"
            deposit.confirm(amount, tx, 6, self.now)
            wallet.credit_from_deposit(deposit.id, amount, tx, self.now)
            return [deposit, wallet]
        wallet, deposit_id = self._wallet(), uuid4()
        address = derive_address(deposit_id, wallet.currency, SECRET)
        deposit = Deposit.create(deposit_id, wallet.id, wallet.currency, address, self.now)
        self.deposits.append((deposit, wallet))
        return [deposit]

    def _api_key(self) -> list[Aggregate]:
        key = ApiKey.create(uuid4(), self.rng.choice(OWNERS), "bench key", ["wallets:read"],
                            hash_secret(secrets.token_hex(16)), None, self.now)
        return [key]


async def fill_tally(dsn: str, plan: Plan) -> int:
    """Append about plan.events events of the mix; return how many the log holds."""
    await migrated(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2, init=init_connection)
    assert pool is not None
    store = EventStore(pool)
    repo = Repository(store)
    mix = Mix(random.Random(20300101), plan.wallets)
    metadata = {"actor": "bench"}
    appended, pending = 0, 0
    batch: list[Write] = []
    try:
        while appended < plan.events:
            writes = repo.writes(mix.command(), metadata)
            batch.extend(writes)
            pending += sum(len(w.events) for w in writes)
            if pending >= 5000 or appended + pending >= plan.events:
                await store.append(batch)  # a stream may appear twice: each write expects the version before it
                appended += pending
                pending, batch = 0, []
                print(f"\r  appended {appended:,} events", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        await pool.execute("analyze")
        return int(await pool.fetchval("select count(*) from events"))
    finally:
        await store.close()
        await pool.close()


# ---------------------------------------------------------------- the eventsourcing peer


class PeerLedger(Application[UUID]):
    """The peer's application: its events live in table peerledger_events."""


class PeerStream(Aggregate):
    """One Tally stream in the library's store; every event keeps its Tally type name and data."""

    class Started(Aggregate.Created):
        kind: str
        data: dict[str, Any]

    class Happened(Aggregate.Event):
        kind: str
        data: dict[str, Any]

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.kind = kind


PEER_VIEW_DDL = """
CREATE TABLE IF NOT EXISTS {0}.peer_balances (
    wallet_id uuid PRIMARY KEY, owner text NOT NULL, currency text NOT NULL, balance bigint NOT NULL DEFAULT 0,
    locked bigint NOT NULL DEFAULT 0, reserved bigint NOT NULL DEFAULT 0, version int NOT NULL)
"""
PEER_OPEN = "INSERT INTO {0}.peer_balances (wallet_id, owner, currency, version) VALUES (%s, %s, %s, %s)"
PEER_CHANGE = """
UPDATE {0}.peer_balances SET balance = balance + %s, locked = locked + %s, reserved = reserved + %s, version = %s
WHERE wallet_id = %s
"""
# (balance, locked, reserved) per unit of the event's amount, as Tally's balances projection has them.
PEER_DELTAS = {
    "WalletCredited": (1, 0, 0), "WalletDebited": (-1, 0, 0), "DepositCredited": (1, 0, 0),
    "SettlementReceived": (1, 0, 0), "FundsLocked": (0, 1, 0), "LockReleased": (0, -1, 0),
    "LockSettled": (-1, -1, 0), "CreditReserved": (0, 0, 1), "ReservationRolledBack": (0, 0, -1),
    "ReservationExpired": (0, 0, -1),
}


class PeerBalancesView(PostgresTrackingRecorder):
    """The peer's materialised view: a balances table, written with the tracking record in one transaction."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = Identifier(self.datastore.schema)
        self.sql_create_statements.append(SQL(PEER_VIEW_DDL).format(schema))
        self.open_sql = SQL(PEER_OPEN).format(schema)
        self.change_sql = SQL(PEER_CHANGE).format(schema)

    def record(self, wallet_id: UUID, version: int, kind: str, data: dict[str, Any], tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            if kind == "WalletOpened":
                curs.execute(self.open_sql, (wallet_id, data["owner"], data["currency"], version), prepare=True)
            else:
                if kind == "ReservationConfirmed":
                    deltas = (-data["amount"], 0, -data["reserved_amount"])
                else:
                    signs = PEER_DELTAS.get(kind, (0, 0, 0))
                    deltas = tuple(sign * data.get("amount", 0) for sign in signs)
                curs.execute(self.change_sql, (*deltas, version, wallet_id), prepare=True)
            self._insert_tracking(curs, tracking)


class PeerBalances(LibraryProjection[PeerBalancesView]):
    """The library's projection pattern: one process_event per event, dispatched on the event class."""

    name = "peerbalances"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)

    @process_event.register
    def _(self, domain_event: PeerStream.Started, tracking: Tracking) -> None:
        self._wallet_event(domain_event.originator_id, domain_event.originator_version, domain_event.kind,
                           domain_event.data, tracking)

    @process_event.register
    def _(self, domain_event: PeerStream.Happened, tracking: Tracking) -> None:
        self._wallet_event(domain_event.originator_id, domain_event.originator_version, domain_event.kind,
                           domain_event.data, tracking)

    def _wallet_event(self, stream: UUID, version: int, kind: str, data: dict[str, Any], tracking: Tracking) -> None:
        if kind in PEER_DELTAS or kind in ("WalletOpened", "ReservationConfirmed"):
            self.view.record(stream, version, kind, data, tracking)
        else:
            self.view.insert_tracking(tracking)


PEER_SAVE_EVENTS = 500
"""Events per app.save(): much larger saves stall in psycopg's pipeline mode on this setup."""


def peer_id(stream_id: str) -> UUID:
    try:
        return UUID(stream_id.partition("-")[2])
    except ValueError:  # chaintx-... and other streams that are not aggregates
        return uuid5(NAMESPACE_URL, stream_id)


async def fill_peer(tally_dsn: str, env: dict[str, str]) -> int:
    """Copy the Tally log into the peer's store, in log order, saving thousands of events per call."""
    app = await asyncio.to_thread(PeerLedger, env)
    streams: dict[str, PeerStream] = {}
    pool = await asyncpg.create_pool(tally_dsn, min_size=1, max_size=1, init=init_connection)
    assert pool is not None
    copied = 0
    try:
        store = EventStore(pool)
        dirty: dict[str, PeerStream] = {}
        async for event in store.iter_all(page_size=5000):
            mirror(streams, dirty, event)
            copied += 1
            if copied % PEER_SAVE_EVENTS == 0:
                await asyncio.to_thread(app.save, *dirty.values())
                dirty = {}
                if copied % 10_000 == 0:
                    print(f"\r  copied {copied:,} events to the peer", end="", file=sys.stderr, flush=True)
        if dirty:
            await asyncio.to_thread(app.save, *dirty.values())
        print(file=sys.stderr)
        await store.close()
    finally:
        await pool.close()
        await asyncio.to_thread(app.close)
    return copied


def mirror(streams: dict[str, PeerStream], dirty: dict[str, PeerStream], event: RecordedEvent) -> None:
    aggregate = streams.get(event.stream_id)
    if aggregate is None:
        aggregate = PeerStream._create(PeerStream.Started, id=peer_id(event.stream_id), kind=event.type,
                                       data=event.data)
        streams[event.stream_id] = aggregate
    else:
        aggregate.trigger_event(PeerStream.Happened, kind=event.type, data=event.data)
    dirty[event.stream_id] = aggregate


def peer_replay(env: dict[str, str], dsn: str, events: int) -> float:
    """A fresh view, then the library's ProjectionRunner until it has tracked every event; seconds."""
    asyncio.run(reset_peer_view(dsn))
    started = time.perf_counter()
    with ProjectionRunner(application_class=PeerLedger, projection_class=PeerBalances,
                          view_class=PeerBalancesView, env=env) as runner:
        last = runner.app.recorder.max_notification_id()
        runner.wait(last, timeout=3600)
    elapsed = time.perf_counter() - started
    if asyncio.run(peer_rows(dsn)) == 0:
        raise RuntimeError("the peer view is empty")
    return elapsed


async def reset_peer_view(dsn: str) -> None:
    async with connected(dsn) as conn:
        await conn.execute("drop table if exists peer_balances, peerbalances_tracking")


async def peer_rows(dsn: str) -> int:
    async with connected(dsn) as conn:
        return int(await conn.fetchval("select count(*) from peer_balances"))


# ---------------------------------------------------------------- tally's rebuild


async def tally_replay(dsn: str, plan: Plan) -> float:
    result = await rebuild(connector(dsn, bench_settings(dsn)), registry.all_projections(),
                           batch_size=plan.batch_size)
    return result.seconds


async def check_balances_match(tally_dsn: str, peer_dsn: str) -> bool:
    """Both sides computed the same balances."""
    sql = "select wallet_id, balance, locked, reserved, version from {} order by wallet_id"
    async with connected(tally_dsn) as tally, connected(peer_dsn) as peer:
        return [tuple(r) for r in await tally.fetch(sql.format("wallet_balances"))] == \
            [tuple(r) for r in await peer.fetch(sql.format("peer_balances"))]


# ---------------------------------------------------------------- live lag


class TimedWatcher(CheckpointWatcher):
    """Remembers when each projection's checkpoint moved, to measure the lag afterwards."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.moves: dict[str, list[tuple[int, float]]] = {}

    def advanced(self, name: str, position: int) -> None:
        self.moves.setdefault(name, []).append((position, time.perf_counter()))
        super().advanced(name, position)


@dataclass
class LagResult:
    commands: int
    seconds: float
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]


async def measure_lag(dsn: str, plan: Plan) -> LagResult:
    await migrated(dsn)
    settings = bench_settings(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=8, init=init_connection)
    assert pool is not None
    store = EventStore(pool)
    listener = Listener(dsn, connect_kwargs=connect_kwargs(settings))
    await listener.start()
    bus = CommandBus(Repository(store))
    watcher = TimedWatcher(pool)
    service = ProjectionService(registry.all_projections(bus), connector(dsn, settings), watcher, settings,
                                listener=listener)
    await service.start()
    rng = random.Random(7)
    commits: list[tuple[int, float]] = []
    try:
        wallet_ids = await open_wallets(bus, 500)
        commits.clear()
        total = int(plan.lag_rate * plan.lag_seconds)
        started = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = started + i / plan.lag_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(lag_command(bus, rng, rng.choice(wallet_ids), commits)))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        last = max(p for p, _ in commits)
        for name in registry.names():
            await watcher.wait_for(name, last, 30)
    finally:
        await service.stop()
        await listener.close()
        await store.close()
        await pool.close()
    p50, p99 = {}, {}
    for name in ("balances", "stats"):
        lags = sorted(lag_of(commits, watcher.moves.get(name, [])))
        p50[name], p99[name] = percentile(lags, 0.50) * 1000, percentile(lags, 0.99) * 1000
    return LagResult(len(commits), seconds, p50, p99)


async def open_wallets(bus: CommandBus, count: int) -> list[UUID]:
    ids = [uuid4() for _ in range(count)]
    repo = bus.repository

    async def open_one(wallet_id: UUID) -> None:
        await run_command(bus, wallet_id, lambda ctx: wallet_commands.open_wallet(repo, ctx, wallet_id, "o", "USD"))
        await run_command(bus, wallet_id, lambda ctx: wallet_commands.credit(repo, ctx, wallet_id, 10**9, "s", None))

    await asyncio.gather(*(open_one(w) for w in ids))
    return ids


async def lag_command(bus: CommandBus, rng: random.Random, wallet_id: UUID, commits: list[tuple[int, float]]) -> None:
    repo, amount, roll = bus.repository, rng.randint(1, 1000), rng.random()
    if roll < 0.5:
        position = await run_command(bus, wallet_id, lambda ctx: wallet_commands.credit(
            repo, ctx, wallet_id, amount, "c", None))
    elif roll < 0.8:
        position = await run_command(bus, wallet_id, lambda ctx: wallet_commands.debit(
            repo, ctx, wallet_id, amount, "d", None))
    else:
        position = await run_command(bus, wallet_id, lambda ctx: wallet_commands.reserve(
            repo, ctx, wallet_id, amount, 3600, None))
    if position:
        commits.append((position, time.perf_counter()))


async def run_command(bus: CommandBus, wallet_id: UUID, decide: Any) -> int:
    try:
        reply = await bus.execute(CommandContext(SYSTEM), [wallet_stream(wallet_id)], decide)
    except DomainError:
        return 0
    return reply.position


def lag_of(commits: list[tuple[int, float]], moves: list[tuple[int, float]]) -> list[float]:
    """For each commit, the first checkpoint move at or past its position, minus the commit time."""
    lags, index = [], 0
    for position, committed in sorted(commits):
        while index < len(moves) and moves[index][0] < position:
            index += 1
        if index < len(moves):
            lags.append(max(0.0, moves[index][1] - committed))
    return lags


# ---------------------------------------------------------------- run


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    tally_s: list[float] = []
    peer_s: list[float] = []
    lag: LagResult | None = None
    async with chosen_server(args.dsn) as server:
        print(await describe_server(server), flush=True)
        events = await replay_rounds(server, plan, tally_s, peer_s)
        if plan.lag:
            async with fresh_database(server, "lag") as dsn:
                lag = await measure_lag(dsn, plan)
    tally_rate = events / median(tally_s) if tally_s else 0.0
    peer_rate = events / median(peer_s) if peer_s else 0.0
    print(f"\n{'impl':<16}{'events':>10}{'median s':>10}{'events/s':>12}  seconds by round")
    print(f"{'tally (6 proj.)':<16}{events:>10}{median(tally_s):>10.2f}{tally_rate:>12,.0f}  "
          + " ".join(f"{s:.2f}" for s in tally_s))
    if peer_s:
        print(f"{'eventsourcing':<16}{events:>10}{median(peer_s):>10.2f}{peer_rate:>12,.0f}  "
              + " ".join(f"{s:.2f}" for s in peer_s))
        print(f"tally/eventsourcing = {tally_rate / peer_rate:.1f}x (target >= 5x); tally >= 50,000 events/s: "
              f"{'yes' if tally_rate >= 50_000 else 'no'}")
    result: dict[str, Any] = {"bench": "replay", "events": events, "events_per_s": round(tally_rate, 1),
                              "peer_events_per_s": round(peer_rate, 1)}
    if lag is not None:
        print(f"lag at {lag.commands / lag.seconds:,.0f} commands/s over {lag.seconds:.1f} s (commit -> read model):")
        for name in lag.p50_ms:
            print(f"  {name:<10} p50 {lag.p50_ms[name]:7.1f} ms   p99 {lag.p99_ms[name]:7.1f} ms")
        result.update(lag_p50_ms=round(lag.p50_ms["balances"], 2), lag_p99_ms=round(lag.p99_ms["balances"], 2))
    return result


async def replay_rounds(server: Server, plan: Plan, tally_s: list[float], peer_s: list[float]) -> int:
    async with fresh_database(server, "replay") as dsn:
        started = time.perf_counter()
        events = await fill_tally(dsn, plan)
        print(f"log: {events:,} events of the command mix in {time.perf_counter() - started:.1f} s", flush=True)
        if plan.peer:
            async with fresh_database(server, "replay_peer") as peer_dsn:
                env = eventsourcing_env(peer_dsn, 1)
                started = time.perf_counter()
                copied = await fill_peer(dsn, env)
                print(f"peer store: {copied:,} events in {time.perf_counter() - started:.1f} s", flush=True)
                for round_no in range(1, plan.rounds + 1):
                    tally_s.append(await tally_replay(dsn, plan))
                    print(f"  round {round_no} tally {tally_s[-1]:.2f} s", file=sys.stderr, flush=True)
                    peer_s.append(await asyncio.to_thread(peer_replay, env, peer_dsn, copied))
                    print(f"  round {round_no} eventsourcing {peer_s[-1]:.2f} s", file=sys.stderr, flush=True)
                same = await check_balances_match(dsn, peer_dsn)
                print(f"balances agree between tally and the peer: {'yes' if same else 'NO'}", flush=True)
        else:
            for round_no in range(1, plan.rounds + 1):
                tally_s.append(await tally_replay(dsn, plan))
                print(f"  round {round_no} tally {tally_s[-1]:.2f} s", file=sys.stderr, flush=True)
    return events
