"""Deposit commands: open a deposit on a wallet, move it through its statuses, credit it once.

Confirming appends three streams in one atomic write: the deposit (``DepositConfirmed``), its
wallet (``DepositCredited``) and a claim stream for the (currency, chain tx id) pair, written with
expected version NO_STREAM. The deposit's expected version makes a deposit credit at most once (a
second confirmation finds it ``confirmed``: invalid_transition); the claim makes a chain
transaction credit at most one deposit. Checking the claim first gives a clear answer; when two
processes race past that check, the store rejects the second claim with WrongExpectedVersion, the
bus retries, and the retry finds the claim and answers ``ChainTxAlreadyCredited``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from backend.commands.errors import NotFound, check_if_match
from backend.commands.wallets import load_wallet, wallet_body
from backend.domain import Deposit, Wallet, deposit_stream, derive_address, wallet_stream
from backend.domain.errors import CurrencyMismatch, InvalidTransition, ValidationError
from backend.domain.money import require_currency
from backend.domain.registry import CHAIN_TX_CLAIMED
from backend.store.events import NO_STREAM, NewEvent, Write
from backend.store.repository import Repository

PENDING, CONFIRMING, CONFIRMED, FAILED, EXPIRED = "pending", "confirming", "confirmed", "failed", "expired"

CLAIM_SCHEMA_VERSION = 1


class ChainTxAlreadyCredited(InvalidTransition):
    """The (currency, chain tx id) pair already credited a deposit (``credited_deposit_id``).

    Its code stays ``invalid_transition`` (with ``reason: chain_tx_already_credited``), so clients
    that only know the stable codes treat it like any other refused transition."""

    def __init__(self, currency: str, chain_tx_id: str, credited_deposit_id: str | None) -> None:
        super().__init__(
            f"chain transaction {chain_tx_id!r} in {currency} already credited deposit {credited_deposit_id}",
            state=CONFIRMED,
            action="confirm",
        )
        self.extra.update(reason="chain_tx_already_credited", credited_deposit_id=credited_deposit_id)
        self.credited_deposit_id = credited_deposit_id


def chain_tx_stream(currency: str, chain_tx_id: str) -> str:
    """``chaintx-<currency>-<sha256 hex>`` of the stripped, lowercased id.

    Chain transaction ids are hex, so case and surrounding blanks must not make one transaction
    look like two; the hash keeps the stream id short whatever the id's length."""
    key = chain_tx_id.strip().lower().encode()
    return f"chaintx-{require_currency(currency)}-{hashlib.sha256(key).hexdigest()}"


def deposit_body(deposit: Deposit) -> dict[str, Any]:
    return {
        "deposit_id": str(deposit.id),
        "wallet_id": str(deposit.wallet_id),
        "currency": deposit.currency,
        "address": deposit.address,
        "status": deposit.status,
        "confirmations": deposit.confirmations,
        "amount": deposit.amount,
        "chain_tx_id": deposit.chain_tx_id,
        "failure_reason": deposit.failure_reason,
        "version": deposit.version,
    }


async def load_deposit(repo: Repository, deposit_id: UUID, *, expected_version: int | None = None) -> Deposit:
    deposit = await repo.find(Deposit, deposit_id)
    if deposit is None:
        raise NotFound(f"deposit {deposit_id} does not exist")
    check_if_match(f"deposit {deposit_id}", deposit.version, expected_version)
    return deposit


def status_streams(deposit: Deposit, status: str, chain_tx_id: str | None) -> list[str]:
    """Every stream a status change may append to, for the bus's in-process locks.

    A deposit's wallet and currency never change, so reading them before taking the locks is safe."""
    streams = [deposit_stream(deposit.id), wallet_stream(deposit.wallet_id)]
    if status == CONFIRMED and chain_tx_id is not None:
        streams.append(chain_tx_stream(deposit.currency, chain_tx_id))
    return streams


async def open_deposit(
    repo: Repository, ctx: CommandContext, deposit_id: UUID, wallet_id: UUID, currency: str, secret: bytes
) -> Decision:
    currency = require_currency(currency)
    wallet = await load_wallet(repo, ctx, wallet_id, verified=True)  # answered with, not written: read it
    if currency != wallet.currency:
        raise CurrencyMismatch(expected=wallet.currency, actual=currency)
    address = derive_address(deposit_id, currency, secret)
    deposit = Deposit.create(deposit_id, wallet_id, currency, address, ctx.now)
    return Decision([deposit], {**deposit_body(deposit), "wallet": wallet_body(wallet, ctx)})


@dataclass(frozen=True, slots=True)
class DepositCommands:
    """Deposit commands wired with their dependencies: the repository and the address secret."""

    repo: Repository
    address_secret: bytes

    def open(self, deposit_id: UUID, wallet_id: UUID, currency: str) -> OpenDeposit:
        return OpenDeposit(self, deposit_id, wallet_id, currency)

    def set_status(self, deposit_id: UUID, status: str, *, confirmations: int = 0, amount: int | None = None,
                   chain_tx_id: str | None = None, reason: str | None = None,
                   if_match: int | None = None) -> SetStatus:
        return SetStatus(self.repo, deposit_id, status, confirmations, amount, chain_tx_id, reason, if_match)


@dataclass(frozen=True, slots=True)
class OpenDeposit:
    wired: DepositCommands
    deposit_id: UUID
    wallet_id: UUID
    currency: str

    async def streams(self) -> Sequence[str]:
        return [deposit_stream(self.deposit_id)]

    async def decide(self, ctx: CommandContext) -> Decision:
        return await open_deposit(self.wired.repo, ctx, self.deposit_id, self.wallet_id, self.currency,
                                  self.wired.address_secret)


@dataclass(frozen=True, slots=True)
class SetStatus:
    """set_status() as a message. Its streams depend on the deposit's wallet and currency, read before
    the locks are taken: both never change, so that read cannot go stale."""

    repo: Repository
    deposit_id: UUID
    status: str
    confirmations: int
    amount: int | None
    chain_tx_id: str | None
    reason: str | None
    if_match: int | None

    async def streams(self) -> Sequence[str]:
        known = await self.repo.find(Deposit, self.deposit_id)
        if known is None:
            raise NotFound(f"deposit {self.deposit_id} does not exist")
        return status_streams(known, self.status, self.chain_tx_id)

    async def decide(self, ctx: CommandContext) -> Decision:
        return await set_status(self.repo, ctx, self.deposit_id, self.status, confirmations=self.confirmations,
                                amount=self.amount, chain_tx_id=self.chain_tx_id, reason=self.reason,
                                if_match=self.if_match)


async def set_status(
    repo: Repository,
    ctx: CommandContext,
    deposit_id: UUID,
    status: str,
    *,
    confirmations: int = 0,
    amount: int | None = None,
    chain_tx_id: str | None = None,
    reason: str | None = None,
    if_match: int | None = None,
) -> Decision:
    """Apply a watcher's status report. No owner check: ``deposits:admin`` acts for every wallet."""
    deposit = await load_deposit(repo, deposit_id, expected_version=if_match)
    wallet = await repo.find(Wallet, deposit.wallet_id)  # answered with, not always written: read
    if wallet is None:
        raise NotFound(f"wallet {deposit.wallet_id} of deposit {deposit_id} does not exist")
    extra_writes: list[Write] = []
    if status == PENDING:
        deposit.mark_pending(confirmations, ctx.now)
    elif status == CONFIRMING:
        deposit.mark_confirming(confirmations, ctx.now)
    elif status == FAILED:
        deposit.fail(reason or "", ctx.now)
    elif status == EXPIRED:
        deposit.expire(ctx.now)
    elif status == CONFIRMED:
        extra_writes.append(await _confirm(repo, ctx, deposit, wallet, confirmations, amount, chain_tx_id))
    else:
        raise ValidationError(f"unknown deposit status {status!r}", field="status")
    body = {**deposit_body(deposit), "wallet": wallet_body(wallet, ctx)}
    return Decision([deposit, wallet], body, extra_writes=extra_writes)


async def _confirm(
    repo: Repository, ctx: CommandContext, deposit: Deposit, wallet: Wallet, confirmations: int,
    amount: int | None, chain_tx_id: str | None,
) -> Write:
    """Confirm and credit; returns the claim write that must commit with both."""
    if amount is None:
        raise ValidationError("amount is required when status is confirmed", field="amount")
    if chain_tx_id is None:
        raise ValidationError("chain_tx_id is required when status is confirmed", field="chain_tx_id")
    deposit.confirm(amount, chain_tx_id, confirmations, ctx.now)  # first: a repeat is invalid_transition
    claim_stream = chain_tx_stream(deposit.currency, chain_tx_id)
    claimed = await repo.store.read_stream(claim_stream, to_version=1)
    if claimed:
        raise ChainTxAlreadyCredited(deposit.currency, chain_tx_id, claimed[0].data.get("deposit_id"))
    wallet.credit_from_deposit(deposit.id, amount, chain_tx_id, ctx.now)
    claim = NewEvent(
        CHAIN_TX_CLAIMED,
        {
            "currency": deposit.currency,
            "chain_tx_id": chain_tx_id,
            "deposit_id": str(deposit.id),
            "wallet_id": str(wallet.id),
            "occurred_at": ctx.now.isoformat(),
        },
        {**ctx.metadata(), "schema_version": CLAIM_SCHEMA_VERSION},
    )
    return Write(claim_stream, NO_STREAM, [claim])
