"""The command handlers and the bus over the in-memory event store (tests/memory_store.py), without a
database: what each command appends, what it refuses (appending nothing), and time moved by a
ManualClock instead of slept through. The same store passes the PostgreSQL store's contract tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest

from backend.clock import ManualClock
from backend.commands import wallets
from backend.commands.bus import Command, CommandBus, Decide, IdempotencyKey
from backend.commands.context import SYSTEM, Actor, CommandContext
from backend.commands.deposits import CONFIRMED, CONFIRMING, ChainTxAlreadyCredited, DepositCommands, chain_tx_stream
from backend.commands.errors import Forbidden, IdempotencyConflict, NotFound, PreconditionFailed
from backend.commands.outcome import Outcome
from backend.domain import Wallet, deposit_stream, wallet_stream
from backend.domain.errors import (
    InsufficientFunds,
    InvalidTransition,
    LockNotOpen,
    ReservationExpired,
    ReservationNotOpen,
)
from backend.store.events import RecordedEvent
from backend.store.repository import Repository
from tests.memory_store import MemoryEventStore

START = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass
class Ledger:
    """One process's command side over an in-memory log: its repository, its bus, its clock."""

    store: MemoryEventStore
    clock: ManualClock
    bus: CommandBus

    @classmethod
    def over(cls, store: MemoryEventStore, clock: ManualClock) -> Ledger:
        return cls(store, clock, CommandBus(Repository(store), clock=clock))

    @property
    def repo(self) -> Repository:
        return self.bus.repository

    async def run(self, streams: Sequence[str], decide: Decide, *, actor: Actor = SYSTEM,
                  idem: IdempotencyKey | None = None) -> Outcome:
        return await self.bus.execute(CommandContext(actor, now=self.clock.now()), streams, decide, idem)

    async def send(self, command: Command) -> Outcome:
        return await self.bus.run(CommandContext(SYSTEM, now=self.clock.now()), command)

    async def on_wallet(self, wallet_id: UUID, decide: Decide, **options: object) -> Outcome:
        return await self.run([wallet_stream(wallet_id)], decide, **options)  # type: ignore[arg-type]

    async def open(self, owner: str = "alice", currency: str = "USD", funds: int = 0) -> UUID:
        wallet_id = uuid4()
        await self.on_wallet(wallet_id, lambda ctx: wallets.open_wallet(self.repo, ctx, wallet_id, owner, currency))
        if funds:
            await self.credit(wallet_id, funds)
        return wallet_id

    async def credit(self, wallet_id: UUID, amount: int, reference: str = "top-up") -> Outcome:
        return await self.on_wallet(wallet_id, lambda ctx: wallets.credit(self.repo, ctx, wallet_id, amount,
                                                                          reference, None))

    async def debit(self, wallet_id: UUID, amount: int, reference: str = "spend", **options: object) -> Outcome:
        return await self.on_wallet(wallet_id, lambda ctx: wallets.debit(self.repo, ctx, wallet_id, amount,
                                                                         reference, None), **options)

    async def wallet(self, wallet_id: UUID) -> Wallet:
        """The wallet folded from the log alone (a repository with nothing cached)."""
        return await Repository(self.store).get(Wallet, wallet_id)

    async def events(self, stream: str) -> list[RecordedEvent]:
        return await self.store.read_stream(stream)


@pytest.fixture
async def ledger() -> AsyncIterator[Ledger]:
    store = MemoryEventStore()
    try:
        yield Ledger.over(store, ManualClock(START))
    finally:
        await store.close()


def figures(wallet: Wallet, now: datetime) -> tuple[int, int, int, int]:
    view = wallet.view(now)
    return view.balance, view.available, view.locked, view.reserved


async def test_credit_and_debit_append_one_event_each_at_consecutive_positions(ledger: Ledger) -> None:
    wallet_id = await ledger.open()
    credited = await ledger.credit(wallet_id, 500)
    debited = await ledger.debit(wallet_id, 200)
    assert (credited.position, debited.position) == (2, 3)
    events = await ledger.events(wallet_stream(wallet_id))
    assert [(e.version, e.position, e.type, e.data.get("amount")) for e in events] == [
        (1, 1, "WalletOpened", None), (2, 2, "WalletCredited", 500), (3, 3, "WalletDebited", 200)]
    assert all(e.metadata["actor"] == "system" for e in events)
    assert figures(await ledger.wallet(wallet_id), ledger.clock.now()) == (300, 300, 0, 0)


async def test_an_overdraft_is_refused_and_appends_nothing(ledger: Ledger) -> None:
    wallet_id = await ledger.open(funds=300)
    head = await ledger.store.head()
    with pytest.raises(InsufficientFunds) as refused:
        await ledger.debit(wallet_id, 301)
    assert (refused.value.code, refused.value.extra) == ("insufficient_funds", {"requested": 301, "available": 300})
    assert await ledger.store.head() == head
    await ledger.debit(wallet_id, 300)  # exactly the balance is fine
    assert figures(await ledger.wallet(wallet_id), ledger.clock.now()) == (0, 0, 0, 0)


async def test_concurrent_debits_never_overdraw(ledger: Ledger) -> None:
    wallet_id = await ledger.open(funds=100)
    outcomes = await asyncio.gather(*(ledger.debit(wallet_id, 10, f"d{i}") for i in range(15)),
                                    return_exceptions=True)
    assert sum(isinstance(o, Outcome) for o in outcomes) == 10
    assert sum(isinstance(o, InsufficientFunds) for o in outcomes) == 5
    wallet = await ledger.wallet(wallet_id)
    assert (wallet.balance, wallet.version) == (0, 12)


async def test_two_processes_racing_on_one_wallet_retry_and_never_overdraw(ledger: Ledger) -> None:
    """Two buses, each with its own cache, on one log: a loser's stale version fails its append and it
    decides again on what the log holds."""
    other = Ledger.over(ledger.store, ledger.clock)
    wallet_id = await ledger.open(funds=100)
    outcomes = await asyncio.gather(*(side.debit(wallet_id, 10, f"d{i}") for i in range(6)
                                      for side in (ledger, other)), return_exceptions=True)
    assert sum(isinstance(o, Outcome) for o in outcomes) == 10
    assert all(isinstance(o, Outcome | InsufficientFunds) for o in outcomes), outcomes
    assert ledger.bus.conflicts + other.bus.conflicts > 0
    assert (await ledger.wallet(wallet_id)).balance == 0


async def test_access_and_if_match_are_checked_before_anything_is_appended(ledger: Ledger) -> None:
    wallet_id = await ledger.open(owner="alice", funds=50)
    mallory = Actor("k-mallory", "mallory", frozenset({"wallets:write"}))
    head = await ledger.store.head()
    with pytest.raises(Forbidden):
        await ledger.debit(wallet_id, 1, actor=mallory)
    with pytest.raises(PreconditionFailed):
        await ledger.on_wallet(wallet_id, lambda ctx: wallets.debit(ledger.repo, ctx, wallet_id, 1, "x", 1))
    with pytest.raises(NotFound):
        await ledger.debit(uuid4(), 1)
    assert await ledger.store.head() == head
    await ledger.on_wallet(wallet_id, lambda ctx: wallets.debit(ledger.repo, ctx, wallet_id, 1, "x", 2))


async def test_escrow_locks_release_and_settle_into_the_payee_in_one_append(ledger: Ledger) -> None:
    payer, payee = await ledger.open(funds=1000), await ledger.open(owner="bob")
    now = ledger.clock.now()
    released, settled = uuid4(), uuid4()

    await ledger.on_wallet(payer, lambda ctx: wallets.lock(ledger.repo, ctx, payer, released, 300, "hold", None))
    assert figures(await ledger.wallet(payer), now) == (1000, 700, 300, 0)
    with pytest.raises(InsufficientFunds):  # what is locked is not available
        await ledger.debit(payer, 701)
    await ledger.on_wallet(payer, lambda ctx: wallets.release(ledger.repo, ctx, payer, released, None))
    assert figures(await ledger.wallet(payer), now) == (1000, 1000, 0, 0)

    await ledger.on_wallet(payer, lambda ctx: wallets.lock(ledger.repo, ctx, payer, settled, 400, "escrow", None))
    head = await ledger.store.head()
    reply = await ledger.send(wallets.Settle(ledger.repo, payer, settled, payee, None))
    assert reply.position == head + 2
    log = await ledger.store.read_all(head)
    assert [(e.stream_id, e.type, e.data["amount"]) for e in log] == [
        (wallet_stream(payer), "LockSettled", 400), (wallet_stream(payee), "SettlementReceived", 400)]
    assert figures(await ledger.wallet(payer), now) == (600, 600, 0, 0)
    assert figures(await ledger.wallet(payee), now) == (400, 400, 0, 0)

    def release(lock_id: UUID) -> Decide:
        return lambda ctx: wallets.release(ledger.repo, ctx, payer, lock_id, None)

    head = await ledger.store.head()
    for closed in (released, settled):  # a closed lock neither releases nor settles again
        with pytest.raises(LockNotOpen):
            await ledger.send(wallets.Settle(ledger.repo, payer, closed, payee, None))
        with pytest.raises(LockNotOpen):
            await ledger.on_wallet(payer, release(closed))
    assert await ledger.store.head() == head


async def test_reservations_confirm_roll_back_and_expire_as_the_clock_moves(ledger: Ledger) -> None:
    wallet_id = await ledger.open(funds=1000)
    confirmed, rolled_back, expiring = uuid4(), uuid4(), uuid4()

    def reserve(reservation_id: UUID, amount: int, ttl: int) -> Decide:
        return lambda ctx: wallets.reserve(ledger.repo, ctx, wallet_id, amount, ttl, None, reservation_id)

    await ledger.on_wallet(wallet_id, reserve(confirmed, 100, 60))
    await ledger.on_wallet(wallet_id, reserve(rolled_back, 200, 60))
    await ledger.on_wallet(wallet_id, reserve(expiring, 300, 120))
    assert figures(await ledger.wallet(wallet_id), ledger.clock.now()) == (1000, 400, 0, 600)

    ledger.clock.advance(59)
    await ledger.on_wallet(wallet_id, lambda ctx: wallets.confirm(ledger.repo, ctx, wallet_id, confirmed, 40, None))
    await ledger.on_wallet(wallet_id, lambda ctx: wallets.rollback(ledger.repo, ctx, wallet_id, rolled_back, None))
    assert figures(await ledger.wallet(wallet_id), ledger.clock.now()) == (960, 660, 0, 300)

    head = await ledger.store.head()
    with pytest.raises(InvalidTransition):  # not due yet
        await ledger.on_wallet(wallet_id, lambda ctx: wallets.expire(ledger.repo, ctx, wallet_id, expiring))
    ledger.clock.advance(61)  # 120 s after it was made: due now
    assert figures(await ledger.wallet(wallet_id), ledger.clock.now()) == (960, 960, 0, 0)  # due counts as free
    with pytest.raises(ReservationExpired):
        await ledger.on_wallet(wallet_id, lambda ctx: wallets.confirm(ledger.repo, ctx, wallet_id, expiring, None,
                                                                      None))
    assert await ledger.store.head() == head  # refusals appended nothing

    await ledger.on_wallet(wallet_id, lambda ctx: wallets.expire(ledger.repo, ctx, wallet_id, expiring))
    [expired] = (await ledger.events(wallet_stream(wallet_id)))[-1:]
    assert (expired.type, expired.data["amount"]) == ("ReservationExpired", 300)
    assert expired.data["occurred_at"] == ledger.clock.now().isoformat()  # the clock's time, not the host's
    with pytest.raises(ReservationNotOpen):
        await ledger.on_wallet(wallet_id, lambda ctx: wallets.expire(ledger.repo, ctx, wallet_id, expiring))


async def test_an_idempotency_key_answers_a_repeat_from_its_first_outcome(ledger: Ledger) -> None:
    wallet_id = await ledger.open(funds=100)
    key = IdempotencyKey("alice", "debit-1", b"fingerprint")
    first = await ledger.debit(wallet_id, 30, idem=key)
    again = await ledger.debit(wallet_id, 30, idem=key)
    assert (again.replayed, again.position, again.answer, again.refusal) == (True, first.position, first.answer, None)
    assert (await ledger.wallet(wallet_id)).balance == 70
    with pytest.raises(IdempotencyConflict):
        await ledger.debit(wallet_id, 30, idem=IdempotencyKey("alice", "debit-1", b"another request"))

    refusal = IdempotencyKey("alice", "debit-2", b"fp")
    with pytest.raises(InsufficientFunds):
        await ledger.debit(wallet_id, 500, idem=refusal)
    await ledger.credit(wallet_id, 1000)  # the debit could go through now, but its key has an outcome
    replayed = await ledger.debit(wallet_id, 500, idem=refusal)
    assert replayed.replayed and replayed.refusal is not None
    assert replayed.refusal.code == InsufficientFunds.code
    assert (await ledger.wallet(wallet_id)).balance == 1070


async def test_a_confirmed_deposit_credits_its_wallet_once_and_its_chain_transaction_once(ledger: Ledger) -> None:
    wallet_id = await ledger.open()
    deposits = DepositCommands(ledger.repo, b"address secret")
    first, second = uuid4(), uuid4()
    for deposit_id in (first, second):
        await ledger.send(deposits.open(deposit_id, wallet_id, "USD"))
        await ledger.send(deposits.set_status(deposit_id, CONFIRMING, confirmations=1))

    head = await ledger.store.head()
    await ledger.send(deposits.set_status(first, CONFIRMED, confirmations=6, amount=500, chain_tx_id="0xAB"))
    log = await ledger.store.read_all(head)
    assert [(e.stream_id, e.type) for e in log] == [
        (deposit_stream(first), "DepositConfirmed"), (wallet_stream(wallet_id), "DepositCredited"),
        (chain_tx_stream("USD", "0xab"), "ChainTxClaimed")]
    assert (await ledger.wallet(wallet_id)).balance == 500

    head = await ledger.store.head()
    with pytest.raises(InvalidTransition):  # the same deposit again
        await ledger.send(deposits.set_status(first, CONFIRMED, confirmations=7, amount=500, chain_tx_id="0xAB"))
    with pytest.raises(ChainTxAlreadyCredited) as again:  # another deposit, the same transaction
        await ledger.send(deposits.set_status(second, CONFIRMED, confirmations=6, amount=500, chain_tx_id=" 0xab "))
    assert again.value.credited_deposit_id == str(first)
    assert await ledger.store.head() == head
    assert (await ledger.wallet(wallet_id)).balance == 500


async def test_racing_confirmations_of_one_chain_transaction_credit_once(ledger: Ledger) -> None:
    """Two processes confirm two deposits with one chain transaction at once: the claim stream's
    expected version lets one through; the other's retry finds the claim."""
    other = Ledger.over(ledger.store, ledger.clock)
    wallet_id = await ledger.open()
    deposit_ids = [uuid4(), uuid4()]
    for deposit_id in deposit_ids:
        await ledger.send(DepositCommands(ledger.repo, b"s").open(deposit_id, wallet_id, "USD"))
        await ledger.send(DepositCommands(ledger.repo, b"s").set_status(deposit_id, CONFIRMING, confirmations=1))
    outcomes = await asyncio.gather(*(
        side.send(DepositCommands(side.repo, b"s").set_status(deposit_id, CONFIRMED, confirmations=6, amount=250,
                                                              chain_tx_id="0xcafe"))
        for side, deposit_id in zip((ledger, other), deposit_ids, strict=True)), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["ChainTxAlreadyCredited", "Outcome"]
    assert (await ledger.wallet(wallet_id)).balance == 250
    assert len(await ledger.events(chain_tx_stream("USD", "0xcafe"))) == 1


async def test_a_status_change_of_an_unknown_deposit_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.send(DepositCommands(ledger.repo, b"s").set_status(uuid4(), CONFIRMED, amount=1,
                                                                         chain_tx_id="0x1"))
    assert await ledger.store.head() == 0
