"""Deposit: an incoming payment to a wallet through a per-deposit address.

Status machine (anything else raises ``InvalidTransition``)::

    pending    -> confirming | failed | expired
    confirming -> pending | confirmed | failed | expired
    confirmed, failed, expired: terminal

Confirming a deposit does not touch the wallet: the command layer calls
``wallet.credit_from_deposit(deposit.id, deposit.amount, deposit.chain_tx_id, now)`` and appends
both streams in one atomic write. Since ``confirmed`` is terminal, the credit happens once.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

from .errors import InvalidTransition, require_count, require_text, require_utc, require_uuid
from .money import require_amount, require_currency

PENDING, CONFIRMING, CONFIRMED = "pending", "confirming", "confirmed"
FAILED, EXPIRED = "failed", "expired"

TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING: frozenset({CONFIRMING, FAILED, EXPIRED}),
    CONFIRMING: frozenset({PENDING, CONFIRMED, FAILED, EXPIRED}),
    CONFIRMED: frozenset(),
    FAILED: frozenset(),
    EXPIRED: frozenset(),
}

_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_EVM = frozenset({"ETH", "USDT", "USDC"})


def derive_address(deposit_id: UUID, currency: str, secret: bytes) -> str:
    """The deposit address: ``d = HMAC-SHA256(secret, deposit_id.bytes)``, formatted per currency.

    - BTC: ``"tb1q"`` + the first 38 characters of ``d`` in the bech32 alphabet
      (``qpzry9x8gf2tvdw0s3jn54khce6mua7l``, 5 bits a character, most significant first).
      Looks like a testnet address; it carries no bech32 checksum.
    - ETH, USDT, USDC (EVM chains): ``"0x"`` + the first 20 bytes of ``d`` as lowercase hex.
    - Fiat: a virtual account ``"TLY" + CC + NNNNNNNNNNNNNNNNNN`` where the 18 digits are
      ``int(d) mod 10**18`` and ``CC`` are ISO 7064 mod-97 check digits computed as for an
      IBAN (so ``int(N + "292134" + CC) % 97 == 1``, with T=29 L=21 Y=34).

    Same inputs, same address; without the secret an address reveals nothing about the id.
    """
    currency = require_currency(currency)
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("the address secret must be non-empty bytes")
    digest = hmac.new(secret, require_uuid(deposit_id, "deposit_id").bytes, hashlib.sha256).digest()
    if currency == "BTC":
        bits = int.from_bytes(digest, "big")
        chars = [_BECH32[(bits >> (256 - 5 * (i + 1))) & 31] for i in range(38)]
        return "tb1q" + "".join(chars)
    if currency in _EVM:
        return "0x" + digest[:20].hex()
    account = f"{int.from_bytes(digest, 'big') % 10**18:018d}"
    check = 98 - int(account + _letters_as_digits("TLY") + "00") % 97
    return f"TLY{check:02d}{account}"


def _letters_as_digits(letters: str) -> str:
    return "".join(str(ord(c) - ord("A") + 10) for c in letters)


class Deposit(Aggregate):
    class Event(Aggregate.Event):
        """Base class of every deposit event."""

    class DepositCreated(Event, Aggregate.Created):
        wallet_id: UUID
        currency: str
        address: str

    class DepositConfirming(Event):
        confirmations: int

        def apply(self, aggregate: Deposit) -> None:
            aggregate.status = CONFIRMING
            aggregate.confirmations = self.confirmations

    class DepositPending(Event):
        """Back to pending (e.g. the transaction left the chain after a reorg)."""

        confirmations: int

        def apply(self, aggregate: Deposit) -> None:
            aggregate.status = PENDING
            aggregate.confirmations = self.confirmations

    class DepositConfirmed(Event):
        amount: int
        chain_tx_id: str
        confirmations: int

        def apply(self, aggregate: Deposit) -> None:
            aggregate.status = CONFIRMED
            aggregate.amount = self.amount
            aggregate.chain_tx_id = self.chain_tx_id
            aggregate.confirmations = self.confirmations

    class DepositFailed(Event):
        reason: str

        def apply(self, aggregate: Deposit) -> None:
            aggregate.status = FAILED
            aggregate.failure_reason = self.reason

    class DepositExpired(Event):
        def apply(self, aggregate: Deposit) -> None:
            aggregate.status = EXPIRED

    def __init__(self, wallet_id: UUID, currency: str, address: str) -> None:
        """Applies ``DepositCreated``."""
        self.wallet_id = wallet_id
        self.currency = currency
        self.address = address
        self.status = PENDING
        self.confirmations = 0
        self.amount: int | None = None
        self.chain_tx_id: str | None = None
        self.failure_reason: str | None = None

    @classmethod
    def create(cls, deposit_id: UUID, wallet_id: UUID, currency: str, address: str, now: datetime) -> Deposit:
        """``address`` comes from ``derive_address`` (the secret is configuration, not domain)."""
        return cls._create(
            cls.DepositCreated,
            id=require_uuid(deposit_id, "deposit_id"),
            wallet_id=require_uuid(wallet_id, "wallet_id"),
            currency=require_currency(currency),
            address=require_text(address, "address", max_length=128),
            timestamp=require_utc(now),
        )

    def can_transition(self, to_status: str) -> bool:
        return to_status in TRANSITIONS[self.status]

    def mark_confirming(self, confirmations: int, now: datetime) -> None:
        now = require_utc(now)
        confirmations = require_count(confirmations, "confirmations")
        self._require_transition(CONFIRMING)
        self._record(self.DepositConfirming, now, confirmations=confirmations)

    def mark_pending(self, confirmations: int, now: datetime) -> None:
        now = require_utc(now)
        confirmations = require_count(confirmations, "confirmations")
        self._require_transition(PENDING)
        self._record(self.DepositPending, now, confirmations=confirmations)

    def confirm(self, amount: int, chain_tx_id: str, confirmations: int, now: datetime) -> None:
        now = require_utc(now)
        amount = require_amount(amount)
        chain_tx_id = require_text(chain_tx_id, "chain_tx_id")
        confirmations = require_count(confirmations, "confirmations")
        self._require_transition(CONFIRMED)
        self._record(
            self.DepositConfirmed,
            now,
            amount=amount,
            chain_tx_id=chain_tx_id,
            confirmations=confirmations,
        )

    def fail(self, reason: str, now: datetime) -> None:
        now = require_utc(now)
        reason = require_text(reason, "reason", allow_empty=True)
        self._require_transition(FAILED)
        self._record(self.DepositFailed, now, reason=reason)

    def expire(self, now: datetime) -> None:
        now = require_utc(now)
        self._require_transition(EXPIRED)
        self._record(self.DepositExpired, now)

    def _require_transition(self, to_status: str) -> None:
        if not self.can_transition(to_status):
            raise InvalidTransition(
                f"deposit {self.id} cannot go from {self.status} to {to_status}",
                state=self.status,
                action=to_status,
            )

    def _record(self, event_class: type[Deposit.Event], now: datetime, **fields: Any) -> None:
        self.trigger_event(event_class, timestamp=now, **fields)
