"""Faults under load, with real processes: two `serve` workers on one database of a cluster this module
starts itself, a bounded mixed command load retrying with the same Idempotency-Key, and one fault per
scenario: kill -9 of a worker, `pg_ctl restart -m fast` and `-m immediate`, SIGTERM of a worker.

Each scenario asserts: every command gets a final answer; no 5xx but 503; every acknowledged command is
in the log exactly once (by its reference, which is its Idempotency-Key) at the position it was
answered with, and no refused one is; the balances read back equal the acknowledged movements; the
read models equal the fold of the log; the hash chains verify; every surviving worker exits 0 on
SIGTERM. Each prints its figures (a `FAULT ...` line; run with -s to see them).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import create_fresh_database
from tests.system.cluster import Cluster, create_cluster, remove_cluster
from tests.system.ledger_checks import check_ledger
from tests.system.procs import Process, create_key, free_port

pytestmark = pytest.mark.system

CLIENTS = 12
WALLETS = 4
SEED = 1_000_000
BEFORE_FAULT_S = 3.0
AFTER_RECOVERY_S = 4.0
SETTLE_WITHIN_S = 45.0
"""A command still without a final answer this long after it was first sent counts as lost."""
SERVER_ENV = {
    "POOL_MIN_SIZE": "2", "POOL_MAX_SIZE": "8", "CONNECT_TIMEOUT_S": "2", "COMMAND_TIMEOUT_S": "5",
    "LISTENER_POLL_S": "0.5", "SHUTDOWN_TIMEOUT_S": "10", "RATE_LIMIT_PER_S": "0", "LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    made = create_cluster(free_port())
    try:
        yield made
    finally:
        remove_cluster(made)


@dataclass
class Movement:
    key: str
    wallet: str
    kind: str  # "credits" | "debits"
    amount: int
    status: int | None = None
    code: str | None = None
    position: int | None = None


@dataclass
class Load:
    """CLIENTS clients sending credits and debits until stop() and then settling what they sent."""

    servers: list[Process]
    token: str
    wallets: list[str]
    answers: Counter[str] = field(default_factory=Counter)
    movements: list[Movement] = field(default_factory=list)
    dropped: list[tuple[str, float]] = field(default_factory=list)
    """(server, time) of requests whose connection closed without an answer."""
    unanswered: list[Movement] = field(default_factory=list)
    spanning: Counter[str] = field(default_factory=Counter)
    """Per server: requests sent before the fault and answered after it (in flight when it struck)."""
    fault_at: float | None = None
    first_ok_after_fault: float | None = None
    _issuing: bool = True

    def stop(self) -> None:
        self._issuing = False

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a fresh connection per request
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await asyncio.gather(*(self._client(http, n) for n in range(CLIENTS)))

    async def _client(self, http: aiohttp.ClientSession, n: int) -> None:
        rng = random.Random(n)
        turn = n
        while self._issuing:
            kind = rng.choice(["credits", "debits"])
            amount = 100 * SEED if kind == "debits" and rng.random() < 0.05 else rng.randint(1, 100)  # some 422s
            movement = Movement(f"load-{uuid.uuid4()}", rng.choice(self.wallets), kind, amount)
            self.movements.append(movement)
            turn = await self._settle(http, movement, turn)

    async def _settle(self, http: aiohttp.ClientSession, movement: Movement, turn: int) -> int:
        body = {"amount": movement.amount, "reference": movement.key}
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": movement.key}
        deadline = time.monotonic() + SETTLE_WITHIN_S
        while time.monotonic() < deadline:
            server = self.servers[turn % len(self.servers)]
            sent_at = time.monotonic()
            try:
                async with http.post(f"{server.base}/v1/wallets/{movement.wallet}/{movement.kind}", json=body,
                                     headers=headers) as reply:
                    status = reply.status
                    answer = await reply.json(content_type=None)
            except aiohttp.ClientConnectorError:
                self.answers["connection refused"] += 1
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError):
                self.answers["disconnected without an answer"] += 1
                self.dropped.append((server.name, sent_at))
            except TimeoutError:
                self.answers["timed out"] += 1
            else:
                self.answers[str(status)] += 1
                if self.fault_at is not None and sent_at < self.fault_at:
                    self.spanning[server.name] += 1
                code = answer.get("code") if isinstance(answer, dict) else None
                if status < 500 and code != "idempotency_in_flight":
                    movement.status, movement.code = status, code
                    if status < 300:
                        movement.position = answer["position"]
                        if self.fault_at is not None and sent_at >= self.fault_at and self.first_ok_after_fault is None:
                            self.first_ok_after_fault = time.monotonic() - self.fault_at
                    return turn
            turn += 1  # the next try goes to the other worker
            await asyncio.sleep(0.05)
        self.unanswered.append(movement)
        return turn


@dataclass
class Fleet:
    database_url: str
    servers: list[Process]
    token: str
    wallets: list[str]


@pytest.fixture
def fleet(cluster: Cluster) -> Iterator[Fleet]:
    database_url = create_fresh_database(cluster.dsn(), migrated=True)
    token = create_key(database_url)
    servers = [Process.serve(f"worker-{n}", database_url, **SERVER_ENV).start() for n in (1, 2)]
    try:
        for server in servers:
            server.wait_ready()
        wallets = asyncio.run(open_wallets(servers[0].base, token))
        yield Fleet(database_url, servers, token, wallets)
    finally:
        for server in servers:
            server.kill()


async def open_wallets(base: str, token: str) -> list[str]:
    headers = {"Authorization": f"Bearer {token}"}
    wallets = []
    async with aiohttp.ClientSession(base_url=base, headers=headers) as http:
        for n in range(WALLETS):
            async with http.post("/v1/wallets", json={"owner": "faults", "currency": "USD"}) as reply:
                assert reply.status == 201, await reply.text()
                wallet_id = (await reply.json())["wallet_id"]
            async with http.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": SEED, "reference": f"seed-{n}"},
                                 ) as reply:
                assert reply.status == 200, await reply.text()
            wallets.append(wallet_id)
    return wallets


Fault = Callable[[Fleet], float]
"""Injects the fault (blocking, run in a thread); returns when the fault is over (e.g. pg_ctl returned)."""


def scenario(name: str, fleet: Fleet, fault: Fault, *, survivors: list[Process]) -> dict[str, Any]:
    load = Load(fleet.servers, fleet.token, fleet.wallets)

    async def drive() -> float:
        running = asyncio.create_task(load.run())
        await asyncio.sleep(BEFORE_FAULT_S)
        load.fault_at = time.monotonic()
        fault_s = await asyncio.to_thread(fault, fleet)
        await asyncio.sleep(AFTER_RECOVERY_S)
        load.stop()
        await running
        return fault_s

    started = time.monotonic()
    fault_s = asyncio.run(drive())
    load_s = time.monotonic() - started
    acknowledged = [m for m in load.movements if m.status is not None and m.status < 300]
    refused = [m for m in load.movements if m.status is not None and m.status >= 300]
    head, in_log = asyncio.run(read_log(fleet.database_url))
    balances = asyncio.run(read_balances(survivors[0].base, fleet, head))
    exits = {server.name: server.stop() for server in survivors}
    figures = {
        "scenario": name, "load_s": round(load_s, 1), "fault_s": round(fault_s, 2),
        "commands": len(load.movements), "acknowledged": len(acknowledged), "refused": len(refused),
        "unanswered": len(load.unanswered), "answers": dict(sorted(load.answers.items())),
        "first_2xx_after_fault_s": None if load.first_ok_after_fault is None else round(load.first_ok_after_fault, 2),
        "answered_across_fault_by": dict(load.spanning),
        "dropped_by": dict(Counter(server for server, _ in load.dropped)),
        "dropped_sent_after_fault": sum(1 for _, sent in load.dropped if load.fault_at and sent >= load.fault_at),
        "exit_status": exits, "log_head": head,
    }
    print(f"\nFAULT {json.dumps(figures)}")

    assert not load.unanswered, f"{len(load.unanswered)} commands never got a final answer"
    assert {(m.status, m.code) for m in refused} <= {(422, "insufficient_funds")}
    assert [m.key for m in refused] == [m.key for m in load.movements if m.amount > SEED], "refused: only overdrafts"
    check_log(in_log, acknowledged, refused, load.unanswered)
    expected = dict.fromkeys(fleet.wallets, SEED)
    for m in acknowledged:
        expected[m.wallet] += m.amount if m.kind == "credits" else -m.amount
    assert balances == expected
    check_ledger_at_rest(fleet.database_url)
    server_errors = {status: n for status, n in load.answers.items() if status.startswith("5") and status != "503"}
    assert not server_errors, f"5xx other than 503: {server_errors}; the workers logged:\n" + "\n".join(
        line for server in fleet.servers for line in server.output().splitlines() if "rror" in line)[-4000:]
    assert all(code == 0 for code in exits.values()), \
        {s.name: (exits[s.name], s.output()[-3000:]) for s in survivors if exits[s.name] != 0}
    return figures


Logged = dict[str, list[tuple[int, str, str, int]]]
"""reference -> [(position, stream_id, type, amount)] of every credit and debit in the log."""


async def read_log(database_url: str) -> tuple[int, Logged]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select position, stream_id, type, data::text as data from events "
                                "where type in ('WalletCredited', 'WalletDebited') order by position")
        head = int(await conn.fetchval("select max(position) from events"))
    finally:
        await conn.close()
    logged: Logged = {}
    for row in rows:
        data = json.loads(row["data"])
        logged.setdefault(data["reference"], []).append((row["position"], row["stream_id"], row["type"],
                                                         data["amount"]))
    return head, logged


async def read_balances(base: str, fleet: Fleet, head: int) -> dict[str, int]:
    """Each wallet's balance from the read model, once it has reached the head of the log."""
    balances = {}
    async with aiohttp.ClientSession(base_url=base, headers={"Authorization": f"Bearer {fleet.token}"}) as http:
        for wallet_id in fleet.wallets:
            async with http.get(f"/v1/wallets/{wallet_id}", params={"min_position": str(head)},
                                headers={"Prefer": "wait=10"}) as reply:
                assert reply.status == 200, await reply.text()
                balances[wallet_id] = (await reply.json())["balance"]
    return balances


def check_log(logged: Logged, acknowledged: list[Movement], refused: list[Movement],
              unanswered: list[Movement]) -> None:
    """Every acknowledged movement exactly once in the log, at the position it was answered with;
    no refused one; nothing that nobody sent."""
    kinds = {"credits": "WalletCredited", "debits": "WalletDebited"}
    not_once = {m.key: logged.get(m.key) for m in acknowledged if len(logged.get(m.key, [])) != 1}
    assert not not_once, f"acknowledged commands not exactly once in the log: {list(not_once.items())[:5]}"
    for m in acknowledged:
        assert logged[m.key] == [(m.position, f"wallet-{m.wallet}", kinds[m.kind], m.amount)], m
    assert not [m.key for m in refused if m.key in logged], "a refused command is in the log"
    sent = {m.key for m in acknowledged} | {m.key for m in unanswered}
    assert {ref for ref in logged if ref.startswith("load-")} <= sent


def check_ledger_at_rest(database_url: str) -> None:
    """With every worker stopped, a projection worker of its own brings the read models to the head;
    they equal the fold of the log and the chains verify."""
    worker = Process.projections("projections", database_url).start()
    try:
        worker.wait_ready()
        asyncio.run(check_ledger(database_url))
        assert worker.stop() == 0, worker.output()
    finally:
        worker.kill()


# ---------------------------------------------------------------- the scenarios


def kill_first_worker(fleet: Fleet) -> float:
    started = time.monotonic()
    fleet.servers[0].kill()
    return time.monotonic() - started


def test_kill_9_of_one_of_two_workers(fleet: Fleet) -> None:
    scenario("kill -9 of one of two workers", fleet, kill_first_worker, survivors=fleet.servers[1:])


def test_pg_ctl_restart_fast(fleet: Fleet, cluster: Cluster) -> None:
    scenario("pg_ctl restart -m fast", fleet, lambda _: cluster.restart("fast"), survivors=fleet.servers)


def test_pg_ctl_restart_immediate(fleet: Fleet, cluster: Cluster) -> None:
    scenario("pg_ctl restart -m immediate", fleet, lambda _: cluster.restart("immediate"), survivors=fleet.servers)


def sigterm_first_worker(fleet: Fleet) -> float:
    started = time.monotonic()
    server = fleet.servers[0]
    server.signal(signal.SIGTERM)
    assert server.proc is not None
    server.proc.wait(30)
    return time.monotonic() - started


def test_sigterm_of_one_of_two_workers(fleet: Fleet) -> None:
    """The drained worker exits 0 and answers every request it had taken: none of its connections
    closes without an answer (refused connections, after its listener closed, are retried)."""
    figures = scenario("SIGTERM of one of two workers", fleet, sigterm_first_worker, survivors=fleet.servers[1:])
    terminated = fleet.servers[0]
    assert terminated.proc is not None
    assert terminated.proc.returncode == 0, terminated.output()[-3000:]
    assert figures["dropped_by"].get(terminated.name, 0) == 0, figures
