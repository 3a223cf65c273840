"""Wallet: the balance of one owner in one currency, with locks and expiring reservations.

Commands validate against the state *as of* ``now`` and raise a ``DomainError`` before
recording anything, so a command that raises leaves no pending events. Event ``apply``
methods only mutate: they re-run on every replay and must accept any recorded history.

Expiry: a reservation whose ``expires_at <= now`` counts as expired for every command and
for ``view(now)``, even before ``expire`` is called. Each state-changing command first
records ``ReservationExpired`` for every such reservation (in id order) and only then its
own event, so ``balance - locked - reserved >= 0`` holds at every version of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from eventsourcing.domain import Aggregate

from . import errors
from .closed import AppendOnlyMap
from .errors import require_text, require_utc, require_uuid
from .money import MAX_AMOUNT, require_amount, require_currency

# Terminal states remembered for closed locks and reservations.
RELEASED, SETTLED = "released", "settled"
CONFIRMED, ROLLED_BACK, EXPIRED = "confirmed", "rolled_back", "expired"


class Reservation(NamedTuple):
    amount: int
    expires_at: datetime


@dataclass(frozen=True)
class WalletView:
    """A wallet's figures as of some instant, with due reservations counted as expired."""

    wallet_id: UUID
    owner: str
    currency: str
    balance: int
    available: int
    locked: int
    reserved: int
    version: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "wallet_id": str(self.wallet_id),
            "owner": self.owner,
            "currency": self.currency,
            "balance": self.balance,
            "available": self.available,
            "locked": self.locked,
            "reserved": self.reserved,
            "version": self.version,
        }


class Wallet(Aggregate):
    class_version = 2
    """2: the closed ids are AppendOnlyMaps (snapshots of version 1 are ignored, the stream replayed)."""

    # ------------------------------------------------------------------ events

    class Event(Aggregate.Event):
        """Base class of every wallet event."""

    class WalletOpened(Event, Aggregate.Created):
        owner: str
        currency: str

    class WalletCredited(Event):
        amount: int
        reference: str

        def apply(self, aggregate: Wallet) -> None:
            aggregate.balance += self.amount

    class WalletDebited(Event):
        amount: int
        reference: str

        def apply(self, aggregate: Wallet) -> None:
            aggregate.balance -= self.amount

    class FundsLocked(Event):
        lock_id: UUID
        amount: int
        reason: str

        def apply(self, aggregate: Wallet) -> None:
            aggregate.locks[self.lock_id] = self.amount
            aggregate.locked += self.amount

    class LockReleased(Event):
        lock_id: UUID
        amount: int

        def apply(self, aggregate: Wallet) -> None:
            aggregate.locks.pop(self.lock_id, None)
            aggregate.locked -= self.amount
            aggregate.closed_locks[self.lock_id] = RELEASED

    class LockSettled(Event):
        lock_id: UUID
        amount: int
        to_wallet_id: UUID

        def apply(self, aggregate: Wallet) -> None:
            aggregate.locks.pop(self.lock_id, None)
            aggregate.locked -= self.amount
            aggregate.balance -= self.amount
            aggregate.closed_locks[self.lock_id] = SETTLED

    class SettlementReceived(Event):
        lock_id: UUID
        amount: int
        from_wallet_id: UUID

        def apply(self, aggregate: Wallet) -> None:
            aggregate.balance += self.amount

    class CreditReserved(Event):
        reservation_id: UUID
        amount: int
        expires_at: datetime

        def apply(self, aggregate: Wallet) -> None:
            aggregate.reservations[self.reservation_id] = Reservation(self.amount, self.expires_at)
            aggregate.reserved += self.amount

    class ReservationConfirmed(Event):
        """``amount`` leaves the balance; the whole ``reserved_amount`` stops being reserved."""

        reservation_id: UUID
        amount: int
        reserved_amount: int

        def apply(self, aggregate: Wallet) -> None:
            aggregate.reservations.pop(self.reservation_id, None)
            aggregate.reserved -= self.reserved_amount
            aggregate.balance -= self.amount
            aggregate.closed_reservations[self.reservation_id] = CONFIRMED

    class ReservationRolledBack(Event):
        reservation_id: UUID
        amount: int

        def apply(self, aggregate: Wallet) -> None:
            aggregate.reservations.pop(self.reservation_id, None)
            aggregate.reserved -= self.amount
            aggregate.closed_reservations[self.reservation_id] = ROLLED_BACK

    class ReservationExpired(Event):
        reservation_id: UUID
        amount: int
        expires_at: datetime

        def apply(self, aggregate: Wallet) -> None:
            aggregate.reservations.pop(self.reservation_id, None)
            aggregate.reserved -= self.amount
            aggregate.closed_reservations[self.reservation_id] = EXPIRED

    class DepositCredited(Event):
        deposit_id: UUID
        amount: int
        chain_tx_id: str

        def apply(self, aggregate: Wallet) -> None:
            aggregate.balance += self.amount
            aggregate.credited_deposits[self.deposit_id] = self.chain_tx_id

    # ------------------------------------------------------------------ state

    def __init__(self, owner: str, currency: str) -> None:
        """Applies ``WalletOpened`` (eventsourcing calls it with the event's fields)."""
        self.owner = owner
        self.currency = currency
        self.balance = 0
        self.locked = 0
        self.reserved = 0
        self.locks: dict[UUID, int] = {}
        self.reservations: dict[UUID, Reservation] = {}
        # Closed ids are kept so an id is never reused and each closes exactly once (terminal state,
        # or the chain transaction a deposit was credited by); copying these costs O(log n).
        self.closed_locks: AppendOnlyMap[UUID, str] = AppendOnlyMap()
        self.closed_reservations: AppendOnlyMap[UUID, str] = AppendOnlyMap()
        self.credited_deposits: AppendOnlyMap[UUID, str] = AppendOnlyMap()

    @property
    def available(self) -> int:
        """As recorded; use ``view(now)`` to count due reservations as expired."""
        return self.balance - self.locked - self.reserved

    def view(self, now: datetime) -> WalletView:
        now = require_utc(now)
        due = sum(self.reservations[rid].amount for rid in self._due(now))
        reserved = self.reserved - due
        return WalletView(
            wallet_id=self.id,
            owner=self.owner,
            currency=self.currency,
            balance=self.balance,
            available=self.balance - self.locked - reserved,
            locked=self.locked,
            reserved=reserved,
            version=self.version,
        )

    def reservation_state(self, reservation_id: UUID, now: datetime) -> str | None:
        """``open``, a terminal state, or None if unknown (due reservations read ``expired``)."""
        reservation = self.reservations.get(reservation_id)
        if reservation is not None:
            return EXPIRED if reservation.expires_at <= require_utc(now) else "open"
        return self.closed_reservations.get(reservation_id)

    # ------------------------------------------------------------------ commands

    @classmethod
    def open(cls, wallet_id: UUID, owner: str, currency: str, now: datetime) -> Wallet:
        return cls._create(
            cls.WalletOpened,
            id=require_uuid(wallet_id, "wallet_id"),
            owner=require_text(owner, "owner", max_length=128),
            currency=require_currency(currency),
            timestamp=require_utc(now),
        )

    def credit(self, amount: int, reference: str, now: datetime) -> None:
        now = require_utc(now)
        amount = self._receivable(amount)
        reference = require_text(reference, "reference", allow_empty=True)
        self._expire_due(now)
        self._record(self.WalletCredited, now, amount=amount, reference=reference)

    def debit(self, amount: int, reference: str, now: datetime) -> None:
        now = require_utc(now)
        amount = require_amount(amount)
        reference = require_text(reference, "reference", allow_empty=True)
        self._require_available(amount, now)
        self._expire_due(now)
        self._record(self.WalletDebited, now, amount=amount, reference=reference)

    def lock(self, lock_id: UUID, amount: int, reason: str, now: datetime) -> None:
        now = require_utc(now)
        lock_id = require_uuid(lock_id, "lock_id")
        amount = require_amount(amount)
        reason = require_text(reason, "reason", allow_empty=True)
        if lock_id in self.locks or lock_id in self.closed_locks:
            raise errors.InvalidTransition(
                f"lock {lock_id} already exists", state=self._lock_state(lock_id), action="lock"
            )
        self._require_available(amount, now)
        self._expire_due(now)
        self._record(self.FundsLocked, now, lock_id=lock_id, amount=amount, reason=reason)

    def release(self, lock_id: UUID, now: datetime) -> None:
        now = require_utc(now)
        amount = self._open_lock(lock_id)
        self._expire_due(now)
        self._record(self.LockReleased, now, lock_id=lock_id, amount=amount)

    def settle(self, lock_id: UUID, to_wallet: Wallet, now: datetime) -> None:
        """Move a locked amount to ``to_wallet``; records on both, append both atomically."""
        now = require_utc(now)
        amount = self._open_lock(lock_id)
        if not isinstance(to_wallet, Wallet):
            raise errors.ValidationError("to_wallet must be a Wallet", field="to_wallet_id")
        if to_wallet.id == self.id:
            raise errors.SameWallet(self.id)
        if to_wallet.currency != self.currency:
            raise errors.CurrencyMismatch(expected=self.currency, actual=to_wallet.currency)
        to_wallet._receivable(amount)
        self._expire_due(now)
        to_wallet._expire_due(now)
        self._record(self.LockSettled, now, lock_id=lock_id, amount=amount, to_wallet_id=to_wallet.id)
        to_wallet._record(to_wallet.SettlementReceived, now, lock_id=lock_id, amount=amount, from_wallet_id=self.id)

    def reserve(self, reservation_id: UUID, amount: int, expires_at: datetime, now: datetime) -> None:
        now = require_utc(now)
        reservation_id = require_uuid(reservation_id, "reservation_id")
        amount = require_amount(amount)
        expires_at = require_utc(expires_at, "expires_at")
        if expires_at <= now:
            raise errors.ValidationError("expires_at must be after now", field="expires_at")
        if reservation_id in self.reservations or reservation_id in self.closed_reservations:
            raise errors.InvalidTransition(
                f"reservation {reservation_id} already exists",
                state=self.reservation_state(reservation_id, now),
                action="reserve",
            )
        self._require_available(amount, now)
        self._expire_due(now)
        self._record(
            self.CreditReserved,
            now,
            reservation_id=reservation_id,
            amount=amount,
            expires_at=expires_at,
        )

    def confirm(self, reservation_id: UUID, now: datetime, amount: int | None = None) -> None:
        """Charge ``amount`` (default: all) of an open reservation; the rest returns.

        Raises ``ReservationExpired`` if the reservation is due or was expired, before
        recording anything (no expiry events are left pending by a failed confirm).
        """
        now = require_utc(now)
        reservation = self._open_reservation(reservation_id, now)
        charged = reservation.amount if amount is None else require_amount(amount)
        if charged > reservation.amount:
            raise errors.AmountExceedsReserved(requested=charged, reserved=reservation.amount)
        self._expire_due(now)
        self._record(
            self.ReservationConfirmed,
            now,
            reservation_id=reservation_id,
            amount=charged,
            reserved_amount=reservation.amount,
        )

    def rollback(self, reservation_id: UUID, now: datetime) -> None:
        """Return a reservation to available; ``ReservationExpired`` if due (nothing recorded)."""
        now = require_utc(now)
        reservation = self._open_reservation(reservation_id, now)
        self._expire_due(now)
        self._record(self.ReservationRolledBack, now, reservation_id=reservation_id, amount=reservation.amount)

    def expire(self, reservation_id: UUID, now: datetime) -> None:
        """Record the expiry of a due reservation (and of every other due one, in id order)."""
        now = require_utc(now)
        reservation_id = require_uuid(reservation_id, "reservation_id")
        reservation = self.reservations.get(reservation_id)
        if reservation is None:
            raise errors.ReservationNotOpen(reservation_id, self.closed_reservations.get(reservation_id, "unknown"))
        if now < reservation.expires_at:
            raise errors.InvalidTransition(
                f"reservation {reservation_id} is not due until {reservation.expires_at.isoformat()}",
                state="open",
                action="expire",
            )
        self._expire_due(now)

    def credit_from_deposit(self, deposit_id: UUID, amount: int, chain_tx_id: str, now: datetime) -> None:
        """Credit a confirmed deposit; each deposit id is credited at most once."""
        now = require_utc(now)
        deposit_id = require_uuid(deposit_id, "deposit_id")
        amount = self._receivable(amount)
        chain_tx_id = require_text(chain_tx_id, "chain_tx_id")
        if deposit_id in self.credited_deposits:
            raise errors.InvalidTransition(f"deposit {deposit_id} already credited", state=CONFIRMED, action="credit")
        self._expire_due(now)
        self._record(self.DepositCredited, now, deposit_id=deposit_id, amount=amount, chain_tx_id=chain_tx_id)

    # ------------------------------------------------------------------ helpers

    def _record(self, event_class: type[Wallet.Event], now: datetime, **fields: Any) -> None:
        self.trigger_event(event_class, timestamp=now, **fields)

    def _due(self, now: datetime) -> list[UUID]:
        return sorted(rid for rid, r in self.reservations.items() if r.expires_at <= now)

    def _expire_due(self, now: datetime) -> None:
        for rid in self._due(now):
            r = self.reservations[rid]
            self._record(
                self.ReservationExpired,
                now,
                reservation_id=rid,
                amount=r.amount,
                expires_at=r.expires_at,
            )

    def _require_available(self, amount: int, now: datetime) -> None:
        available = self.view(now).available
        if amount > available:
            raise errors.InsufficientFunds(requested=amount, available=available)

    def _receivable(self, amount: int) -> int:
        amount = require_amount(amount)
        if amount > MAX_AMOUNT - self.balance:
            raise errors.InvalidAmount(f"balance would exceed {MAX_AMOUNT}")
        return amount

    def _lock_state(self, lock_id: UUID) -> str:
        return "open" if lock_id in self.locks else self.closed_locks.get(lock_id, "unknown")

    def _open_lock(self, lock_id: UUID) -> int:
        lock_id = require_uuid(lock_id, "lock_id")
        if lock_id not in self.locks:
            raise errors.LockNotOpen(lock_id, self._lock_state(lock_id))
        return self.locks[lock_id]

    def _open_reservation(self, reservation_id: UUID, now: datetime) -> Reservation:
        reservation_id = require_uuid(reservation_id, "reservation_id")
        reservation = self.reservations.get(reservation_id)
        if reservation is not None:
            if reservation.expires_at <= now:
                raise errors.ReservationExpired(reservation_id, reservation.expires_at)
            return reservation
        state = self.closed_reservations.get(reservation_id, "unknown")
        if state == EXPIRED:
            raise errors.ReservationExpired(reservation_id)
        raise errors.ReservationNotOpen(reservation_id, state)
