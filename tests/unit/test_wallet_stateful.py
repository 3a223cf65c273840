"""Random wallet command sequences against an independent reference model.

After every step: the wallets match the model, the invariants hold, every new event carries
the step's ``now``, and replaying the events through the row mapping (JSON and back) gives
identical wallets, with ``available >= 0`` at every single version of each stream.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as label
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
)

from backend.domain.errors import (
    AmountExceedsReserved,
    DomainError,
    InsufficientFunds,
    InvalidTransition,
    LockNotOpen,
    ReservationExpired,
    ReservationNotOpen,
    SameWallet,
)
from backend.domain.registry import event_from_payload, payload_from_event
from backend.domain.wallet import Wallet

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CLOSES_LOCK = {"LockReleased", "LockSettled"}
CLOSES_RESERVATION = {"ReservationConfirmed", "ReservationRolledBack", "ReservationExpired"}

wallet_index = st.integers(0, 1)
amounts = st.integers(1, 400)


@dataclass
class Model:
    """What a wallet should look like, computed without the aggregate's code."""

    balance: int = 0
    locks: dict[UUID, int] = field(default_factory=dict)
    reservations: dict[UUID, tuple[int, datetime]] = field(default_factory=dict)
    expired: set[UUID] = field(default_factory=set)

    def available(self, now: datetime) -> int:
        live = sum(a for a, expires_at in self.reservations.values() if expires_at > now)
        return self.balance - sum(self.locks.values()) - live

    def sweep(self, now: datetime) -> None:
        for rid, (_, expires_at) in list(self.reservations.items()):
            if expires_at <= now:
                del self.reservations[rid]
                self.expired.add(rid)


class WalletMachine(RuleBasedStateMachine):
    locks = Bundle("locks")
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.wallets = [Wallet.open(uuid4(), o, "USD", T0) for o in ("alice", "bob")]
        self.models = [Model(), Model()]
        self.replicas: list[Wallet | None] = [None, None]
        self.money_in = 0  # credits from outside the two wallets
        self.money_out = 0  # debits and confirmed reservations
        self.closings: Counter[UUID] = Counter()
        self.absorb()

    # ------------------------------------------------------------ helpers

    def attempt(
        self,
        command: Callable[[], None],
        expected: type[DomainError] | None,
        touched: tuple[int, ...],
    ) -> bool:
        """Run a command expecting success or the given error; failed commands record nothing."""
        name = getattr(command, "__qualname__", "command").split(".")[1]
        label(f"{name}: {expected.__name__ if expected else 'ok'}")
        if expected is None:
            command()
            for i in touched:
                self.models[i].sweep(self.now)
            return True
        with pytest.raises(expected):
            command()
        assert all(not w.pending_events for w in self.wallets)
        return False

    def absorb(self) -> None:
        """Map each new event to a JSON row and back, fold it into a replica, check each version."""
        for i, w in enumerate(self.wallets):
            for event in w.collect_events():
                assert event.timestamp == self.now
                name, data = payload_from_event(event)
                row = json.loads(json.dumps({"type": name, "data": data}))
                copy = event_from_payload(
                    row["type"],
                    str(event.originator_id),
                    event.originator_version,
                    event.timestamp.isoformat(),
                    row["data"],
                )
                assert copy == event
                replica = copy.mutate(self.replicas[i])
                assert isinstance(replica, Wallet)
                self.replicas[i] = replica
                assert replica.available >= 0, (name, replica)
                assert replica.locked >= 0 and replica.reserved >= 0
                if name in CLOSES_LOCK:
                    self.closings[copy.lock_id] += 1  # type: ignore[attr-defined]
                if name in CLOSES_RESERVATION:
                    self.closings[copy.reservation_id] += 1  # type: ignore[attr-defined]
            assert self.replicas[i] == w

    # ------------------------------------------------------------ rules

    @rule(seconds=st.integers(0, 90))
    def advance_time(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(i=wallet_index, amount=amounts)
    def credit(self, i: int, amount: int) -> None:
        self.attempt(lambda: self.wallets[i].credit(amount, "top-up", self.now), None, (i,))
        self.models[i].balance += amount
        self.money_in += amount
        self.absorb()

    @rule(i=wallet_index, amount=amounts)
    def debit(self, i: int, amount: int) -> None:
        ok = amount <= self.models[i].available(self.now)
        expected = None if ok else InsufficientFunds
        if self.attempt(lambda: self.wallets[i].debit(amount, "spend", self.now), expected, (i,)):
            self.models[i].balance -= amount
            self.money_out += amount
        self.absorb()

    @rule(target=locks, i=wallet_index, amount=amounts)
    def lock(self, i: int, amount: int) -> object:
        lock_id = uuid4()
        expected = None if amount <= self.models[i].available(self.now) else InsufficientFunds
        ok = self.attempt(lambda: self.wallets[i].lock(lock_id, amount, "hold", self.now), expected, (i,))
        if ok:
            self.models[i].locks[lock_id] = amount
        self.absorb()
        return (i, lock_id) if ok else multiple()

    @rule(ref=locks)
    def release(self, ref: tuple[int, UUID]) -> None:
        i, lock_id = ref
        expected = None if lock_id in self.models[i].locks else LockNotOpen
        if self.attempt(lambda: self.wallets[i].release(lock_id, self.now), expected, (i,)):
            del self.models[i].locks[lock_id]
        self.absorb()

    @rule(ref=locks, j=wallet_index)
    def settle(self, ref: tuple[int, UUID], j: int) -> None:
        i, lock_id = ref
        source, target = self.models[i], self.models[j]
        if lock_id not in source.locks:
            expected: type[DomainError] | None = LockNotOpen
        else:
            expected = SameWallet if i == j else None
        command = lambda: self.wallets[i].settle(lock_id, self.wallets[j], self.now)  # noqa: E731
        if self.attempt(command, expected, (i, j)):
            amount = source.locks.pop(lock_id)
            source.balance -= amount
            target.balance += amount
        self.absorb()

    @rule(i=wallet_index, lock_id=st.uuids())
    def release_unknown(self, i: int, lock_id: UUID) -> None:
        self.attempt(lambda: self.wallets[i].release(lock_id, self.now), LockNotOpen, (i,))

    @rule(target=reservations, i=wallet_index, amount=amounts, ttl=st.integers(1, 120))
    def reserve(self, i: int, amount: int, ttl: int) -> object:
        rid, expires_at = uuid4(), self.now + timedelta(seconds=ttl)
        expected = None if amount <= self.models[i].available(self.now) else InsufficientFunds
        ok = self.attempt(lambda: self.wallets[i].reserve(rid, amount, expires_at, self.now), expected, (i,))
        if ok:
            self.models[i].reservations[rid] = (amount, expires_at)
        self.absorb()
        return (i, rid) if ok else multiple()

    def _closing_error(self, i: int, rid: UUID) -> type[DomainError] | None:
        model = self.models[i]
        if rid in model.reservations:
            return ReservationExpired if model.reservations[rid][1] <= self.now else None
        return ReservationExpired if rid in model.expired else ReservationNotOpen

    @rule(ref=reservations, partial=st.none() | st.integers(1, 450))
    def confirm(self, ref: tuple[int, UUID], partial: int | None) -> None:
        i, rid = ref
        expected = self._closing_error(i, rid)
        if expected is None and partial is not None and partial > self.models[i].reservations[rid][0]:
            expected = AmountExceedsReserved
        command = lambda: self.wallets[i].confirm(rid, self.now, amount=partial)  # noqa: E731
        if self.attempt(command, expected, (i,)):
            reserved, _ = self.models[i].reservations.pop(rid)
            charged = reserved if partial is None else partial
            self.models[i].balance -= charged
            self.money_out += charged
        self.absorb()

    @rule(ref=reservations)
    def rollback(self, ref: tuple[int, UUID]) -> None:
        i, rid = ref
        expected = self._closing_error(i, rid)
        if self.attempt(lambda: self.wallets[i].rollback(rid, self.now), expected, (i,)):
            del self.models[i].reservations[rid]
        self.absorb()

    @rule(ref=reservations)
    def expire(self, ref: tuple[int, UUID]) -> None:
        i, rid = ref
        model = self.models[i]
        if rid not in model.reservations:
            expected: type[DomainError] | None = ReservationNotOpen
        else:
            expected = None if model.reservations[rid][1] <= self.now else InvalidTransition
        self.attempt(lambda: self.wallets[i].expire(rid, self.now), expected, (i,))
        assert rid not in model.reservations or expected is not None
        self.absorb()

    # ------------------------------------------------------------ invariants

    @invariant()
    def wallets_match_the_model(self) -> None:
        for w, model in zip(self.wallets, self.models, strict=True):
            assert w.balance == model.balance
            assert w.locks == model.locks
            assert {r: (v.amount, v.expires_at) for r, v in w.reservations.items()} == (model.reservations)
            assert w.view(self.now).available == model.available(self.now)

    @invariant()
    def sums_and_bounds(self) -> None:
        for w in self.wallets:
            assert w.locked == sum(w.locks.values())
            assert w.reserved == sum(r.amount for r in w.reservations.values())
            assert w.available == w.balance - w.locked - w.reserved >= 0
            assert w.view(self.now).available >= w.available
            assert not w.locks.keys() & w.closed_locks.keys()
            assert not w.reservations.keys() & w.closed_reservations.keys()

    @invariant()
    def money_is_conserved(self) -> None:
        assert sum(w.balance for w in self.wallets) == self.money_in - self.money_out

    @invariant()
    def each_lock_and_reservation_closes_at_most_once(self) -> None:
        assert all(n == 1 for n in self.closings.values())
        for w in self.wallets:
            assert not (w.locks.keys() | w.reservations.keys()) & self.closings.keys()
            assert set(w.closed_locks) | set(w.closed_reservations) <= set(self.closings)


WalletMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestWalletMachine = WalletMachine.TestCase
