"""The command bus's optimistic first attempt: cached state saves a read, and never decides an answer
that the store would contradict, with two "processes" (stores, repositories, buses) on one database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.commands import deposits as deposit_commands
from backend.commands import wallets as wallet_commands
from backend.commands.bus import CommandBus, Decision, IdempotencyKey
from backend.commands.context import SYSTEM, CommandContext
from backend.commands.outcome import Outcome
from backend.domain import Wallet, wallet_stream
from backend.domain.errors import InsufficientFunds
from backend.http import replies
from backend.http.commands import Answer, domain_problem
from backend.store.append import APPEND_LOCK_KEY
from backend.store.event_store import EventStore
from backend.store.repository import Repository
from tests.support import advisory_lock_waiters, eventually


@dataclass(frozen=True)
class Reply:
    """What the HTTP edge would answer for an outcome: its status and body."""

    status: int
    body: bytes
    position: int

    @classmethod
    def of(cls, outcome: Outcome, answer: Answer) -> Reply:
        if outcome.refusal is not None:
            return cls(domain_problem(outcome.refusal).status, b"", outcome.position)
        return cls(200, answer.render(outcome), outcome.position)


@dataclass
class Node:
    store: EventStore
    repository: Repository
    bus: CommandBus

    async def run(self, wallet_id: uuid.UUID, command: str, amount: int, *, if_match: int | None = None,
                  idem: IdempotencyKey | None = None) -> Reply:
        async def decide(ctx: CommandContext) -> Decision:
            handler = getattr(wallet_commands, command)
            decision: Decision = await handler(self.repository, ctx, wallet_id, amount, f"{command}-{amount}", if_match)
            return decision

        answer = Answer(replies.WalletWrite)
        outcome = await self.bus.execute(CommandContext(SYSTEM), [wallet_stream(wallet_id)], decide, idem,
                                         answer.check)
        return Reply.of(outcome, answer)

    def tail_reads(self) -> int:
        return self.store.counters().tail_queries


@pytest.fixture
async def nodes(pool: asyncpg.Pool) -> AsyncIterator[tuple[Node, Node]]:
    made = []
    for _ in range(2):
        store = EventStore(pool)
        repository = Repository(store)
        made.append(Node(store, repository, CommandBus(repository)))
    try:
        yield made[0], made[1]
    finally:
        for node in made:
            await node.store.close()


async def open_wallet(node: Node, balance: int) -> uuid.UUID:
    wallet_id = uuid.uuid4()
    decision = await wallet_commands.open_wallet(node.repository, CommandContext(SYSTEM), wallet_id, "o", "USD")
    await node.repository.save(*decision.aggregates)
    if balance:
        await node.run(wallet_id, "credit", balance)
    return wallet_id


def balance_of(reply: Reply) -> int:
    return int(orjson.loads(reply.body)["balance"])


async def test_a_process_that_appended_last_decides_without_reading(nodes: tuple[Node, Node]) -> None:
    one, _ = nodes
    wallet_id = await open_wallet(one, 100)
    reads = one.tail_reads()
    for _ in range(5):
        await one.run(wallet_id, "debit", 10)
    assert one.tail_reads() == reads
    assert one.store.counters().fenced >= 5


async def test_a_stale_cache_loses_its_append_and_the_retry_decides_on_the_store(nodes: tuple[Node, Node]) -> None:
    one, two = nodes
    wallet_id = await open_wallet(one, 100)
    await two.run(wallet_id, "credit", 50)  # `one` does not know: its cache says 100 at version 2
    reply = await one.run(wallet_id, "debit", 30)
    assert balance_of(reply) == 120
    assert one.bus.conflicts == 1
    wallet = await one.repository.get(Wallet, wallet_id)
    assert wallet.balance == 120


async def test_commands_that_lost_together_decide_again_with_one_read(
    nodes: tuple[Node, Node], pool: asyncpg.Pool
) -> None:
    """Two debits of one process, the second decided on the first's append in flight, both lose to
    another process's credit. The first decides again on a read of the wallet; the second chains on the
    first's retry, still in flight, instead of waiting for its commit to read the wallet again."""
    one, two = nodes
    wallet_id = await open_wallet(one, 100)
    await two.run(wallet_id, "credit", 50)  # `one` does not know: its cache says 100 at version 2
    reads, conflicts = one.tail_reads(), one.bus.conflicts
    async with pool.acquire() as blocker:
        async with blocker.transaction():
            await blocker.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
            first = asyncio.create_task(one.run(wallet_id, "debit", 10))
            await eventually(lambda: advisory_lock_waiters(pool), timeout=5, interval=0.01,
                             what="the first debit's append to reach the store's lock")
            # Decided on the first's append without reading, and queued behind it before the lock goes.
            second = asyncio.create_task(one.run(wallet_id, "debit", 20))
        balances = sorted([balance_of(await first), balance_of(await second)])
    assert balances in ([120, 140], [120, 130])  # either retry may take the stream's lock first
    assert one.bus.conflicts - conflicts == 2
    assert one.tail_reads() - reads == 1
    assert (await one.repository.get(Wallet, wallet_id)).balance == 120


async def test_a_rejection_decided_on_a_stale_cache_is_decided_again(nodes: tuple[Node, Node]) -> None:
    """The cache says 10; another process credited 1,000: the debit of 500 must succeed, not be refused."""
    one, two = nodes
    wallet_id = await open_wallet(one, 10)
    await two.run(wallet_id, "credit", 1000)
    reply = await one.run(wallet_id, "debit", 500)
    assert balance_of(reply) == 510
    with pytest.raises(InsufficientFunds):  # and a real shortfall is still refused
        await one.run(wallet_id, "debit", 511)


async def test_if_match_on_a_version_written_elsewhere_is_honoured(nodes: tuple[Node, Node]) -> None:
    one, two = nodes
    wallet_id = await open_wallet(one, 10)
    written = await two.run(wallet_id, "credit", 5)
    version = int(orjson.loads(written.body)["version"])
    reply = await one.run(wallet_id, "debit", 1, if_match=version)
    assert balance_of(reply) == 14


async def test_a_stored_rejection_is_never_one_the_store_contradicts(nodes: tuple[Node, Node]) -> None:
    """With an Idempotency-Key a refusal is committed for good: it must be decided on the store's state."""
    one, two = nodes
    wallet_id = await open_wallet(one, 10)
    await two.run(wallet_id, "credit", 100)
    idem = IdempotencyKey("scope", uuid.uuid4().hex, b"fp")
    reply = await one.run(wallet_id, "debit", 50, idem=idem)
    assert reply.status == 200 and balance_of(reply) == 60


async def test_two_processes_hammering_one_wallet_keep_it_exact(nodes: tuple[Node, Node]) -> None:
    """Concurrent debits from both sides, each cache often stale: no overdraft, every success counted."""
    one, two = nodes
    wallet_id = await open_wallet(one, 1000)

    async def debit(node: Node) -> bool:
        try:
            await node.run(wallet_id, "debit", 30)
        except InsufficientFunds:
            return False
        return True

    outcomes = await asyncio.gather(*(debit(one if i % 2 else two) for i in range(60)))
    assert sum(outcomes) == 1000 // 30
    wallet = await two.repository.get(Wallet, wallet_id)
    assert wallet.balance == 1000 - 30 * sum(outcomes)


async def test_an_answer_about_an_aggregate_the_command_does_not_write_comes_from_the_store(
    nodes: tuple[Node, Node],
) -> None:
    """Opening a deposit answers with its wallet, which it does not append to: no cached copy will do."""
    one, two = nodes
    wallet_id = await open_wallet(one, 10)
    await two.run(wallet_id, "credit", 5)

    async def decide(ctx: CommandContext) -> Decision:
        return await deposit_commands.open_deposit(one.repository, ctx, uuid.uuid4(), wallet_id, "USD", b"secret")

    outcome = await one.bus.execute(CommandContext(SYSTEM), [], decide)
    reply = Reply.of(outcome, Answer(replies.DepositWrite))
    assert orjson.loads(reply.body)["wallet"]["balance"] == 15


async def test_commands_on_one_wallet_follow_each_other_without_waiting_for_commits(
    nodes: tuple[Node, Node],
) -> None:
    """The second and later debits decide on the state the first leaves while it commits: they share
    a batch instead of each waiting for the previous commit."""
    one, _ = nodes
    wallet_id = await open_wallet(one, 1000)
    reads, batches = one.tail_reads(), one.store.counters().batches
    replies = await asyncio.gather(*(one.run(wallet_id, "debit", 10) for _ in range(20)))
    assert sorted(balance_of(r) for r in replies) == list(range(800, 1000, 10))
    assert one.store.counters().batches - batches == 2  # the first alone, the 19 that followed it together
    assert one.tail_reads() == reads and one.bus.conflicts == 0
    assert (await Repository(one.store).get(Wallet, wallet_id)).balance == 800


async def history_balances(node: Node, wallet_id: uuid.UUID) -> list[int]:
    """The wallet's balance after each of its events, replayed from the store."""
    events = await node.store.read_stream(wallet_stream(wallet_id))
    balances, balance = [], 0
    for event in events:
        sign = {"WalletCredited": 1, "WalletDebited": -1}.get(event.type, 0)
        balance += sign * int(event.data.get("amount", 0))
        balances.append(balance)
    return balances


@pytest.mark.parametrize("same_batch", [False, True])
async def test_a_command_decided_after_an_append_that_did_not_commit_does_not_commit(
    nodes: tuple[Node, Node], same_batch: bool,
) -> None:
    """`one` caches 100 at version 2; `two` debits 90 (version 3). `one` then runs two debits of 50: the
    first expects version 2 and fails; the second was decided on the 50 the first would leave, at
    version 3, which the store's version 3 (two's debit) matches. Its expected version holds, but on a
    different history: it must fail too and be decided again on the store, not overdraw the wallet.
    The two debits land in consecutive batches, or (same_batch) in one batch behind another append."""
    one, two = nodes
    wallet_id = await open_wallet(one, 100)
    other = await open_wallet(one, 0)
    await two.run(wallet_id, "debit", 90)
    commands = [one.run(wallet_id, "debit", 50), one.run(wallet_id, "debit", 50)]
    if same_batch:  # this one runs alone first; both debits queue behind it and share the next batch
        commands.insert(0, one.run(other, "credit", 1))
    batches = one.store.counters().batches
    outcomes = await asyncio.gather(*commands, return_exceptions=True)
    assert [type(o) for o in outcomes[-2:]] == [InsufficientFunds, InsufficientFunds]
    assert one.store.counters().batches - batches >= (2 if same_batch else 1)
    assert await history_balances(one, wallet_id) == [0, 100, 10]
    assert (await one.repository.get(Wallet, wallet_id)).balance == 10


OPS = st.lists(st.tuples(st.sampled_from([0, 1]), st.sampled_from(["debit", "credit"]), st.integers(1, 60)),
               min_size=2, max_size=40)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
async def test_two_processes_chaining_random_commands_keep_the_books(nodes: tuple[Node, Node], ops) -> None:  # type: ignore[no-untyped-def]
    """Random debits and credits from both processes at once: each process chains its commands on its own
    in-flight state while the other's writes make that state stale. Every reply is what the store did,
    and the wallet is never overdrawn at any version."""
    wallet_id = await open_wallet(nodes[0], 100)

    async def run(node: int, command: str, amount: int) -> int:
        try:
            await nodes[node].run(wallet_id, command, amount)
        except InsufficientFunds:
            return 0
        return amount if command == "credit" else -amount

    changes = await asyncio.gather(*(run(*op) for op in ops))
    balances = await history_balances(nodes[0], wallet_id)
    assert min(balances) >= 0
    assert balances[-1] == 100 + sum(changes)
    for node in nodes:
        assert (await node.repository.get(Wallet, wallet_id)).balance == balances[-1]


async def follow(node: Node, after: int) -> int:
    """Hand the node every append after a position, as the process's log tail would (one page)."""
    events = await node.store.read_all(after, 1000)
    await node.repository.follow_log(after, events, events[-1].position)
    return events[-1].position


async def test_a_process_that_follows_the_log_decides_on_another_ones_append_without_reading(
    nodes: tuple[Node, Node],
) -> None:
    """With several workers each follows the others' appends (backend/app.py, store_ctx): the cached
    wallet and the known stream head move on, so the next command is decided from memory and appended
    in one round trip, and the answer is the store's."""
    one, two = nodes
    wallet_id = await open_wallet(one, 100)
    await two.run(wallet_id, "debit", 10)  # `two` caches the wallet at the head it appended
    seen = await two.store.head()
    await one.run(wallet_id, "credit", 50)
    await follow(two, seen)
    reads, fenced, misses = two.tail_reads(), two.store.counters().fenced, two.store.counters().fence_misses
    reply = await two.run(wallet_id, "debit", 20)
    assert balance_of(reply) == 120
    assert (two.tail_reads(), two.store.counters().fenced, two.store.counters().fence_misses) == \
        (reads, fenced + 1, misses)
    assert two.bus.conflicts == 0
    assert (await one.repository.get(Wallet, wallet_id)).balance == 120


async def test_another_process_appending_elsewhere_costs_no_round_trip_and_not_the_locked_path(
    nodes: tuple[Node, Node],
) -> None:
    """Another process appended elsewhere since: this wallet's stream is where the plan started, so the
    same decision goes in on the new log head, further on, in the one round trip."""
    one, two = nodes
    mine, theirs = await open_wallet(one, 100), await open_wallet(two, 100)
    await one.run(mine, "debit", 1)
    await two.run(theirs, "debit", 1)
    before, locked = one.store.counters(), one.store.counters().locked_paths
    reply = await one.run(mine, "debit", 9)
    assert balance_of(reply) == 90
    after = one.store.counters()
    assert (after.fenced, after.fence_misses, after.fenced_shifted) == \
        (before.fenced + 1, before.fence_misses, before.fenced_shifted + 1)
    assert one.store.counters().locked_paths == locked
    assert orjson.loads(reply.body)["position"] == await one.store.head()
