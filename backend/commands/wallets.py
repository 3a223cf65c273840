"""Wallet commands: each loads what it needs, checks access, calls the domain and returns a Decision.

The bus appends the pending events with the loaded versions and retries the whole function when
another writer got there first, so these functions must be pure apart from loading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from backend.commands.errors import Forbidden, NotFound, PreconditionFailed, check_if_match
from backend.domain import Wallet, wallet_stream
from backend.store.repository import Repository


def wallet_body(wallet: Wallet, ctx: CommandContext) -> dict[str, Any]:
    return wallet.view(ctx.now).as_dict()


async def load_wallet(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, *, expected_version: int | None = None,
    verified: bool = False,
) -> Wallet:
    wallet = await repo.find(Wallet, wallet_id, verified=verified)
    if wallet is None:
        raise NotFound(f"wallet {wallet_id} does not exist")
    if not ctx.actor.can_act_for(wallet.owner):
        raise Forbidden(f"wallet {wallet_id} belongs to another owner")
    check_if_match(f"wallet {wallet_id}", wallet.version, expected_version)
    return wallet


async def open_wallet(repo: Repository, ctx: CommandContext, wallet_id: UUID, owner: str, currency: str) -> Decision:
    if not ctx.actor.can_act_for(owner):
        raise Forbidden("this API key may only open wallets for its own owner")
    if await repo.find(Wallet, wallet_id) is not None:
        raise PreconditionFailed(f"wallet {wallet_id} already exists")
    wallet = Wallet.open(wallet_id, owner, currency, ctx.now)
    return Decision([wallet], wallet_body(wallet, ctx))


async def change(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, if_match: int | None, act: Callable[[Wallet], None],
    **answer: str,
) -> Decision:
    """Load the wallet (access, If-Match), let act() call the domain on it, answer with the wallet and
    the ids `answer` names: the shape of every command on one wallet."""
    wallet = await load_wallet(repo, ctx, wallet_id, expected_version=if_match)
    act(wallet)
    return Decision([wallet], {**answer, **wallet_body(wallet, ctx)})


async def credit(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, amount: int, reference: str, if_match: int | None
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.credit(amount, reference, ctx.now))


async def debit(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, amount: int, reference: str, if_match: int | None
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.debit(amount, reference, ctx.now))


async def lock(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, lock_id: UUID, amount: int, reason: str,
    if_match: int | None,
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.lock(lock_id, amount, reason, ctx.now),
                        lock_id=str(lock_id))


async def release(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, lock_id: UUID, if_match: int | None
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.release(lock_id, ctx.now),
                        lock_id=str(lock_id))


async def settle(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, lock_id: UUID, to_wallet_id: UUID,
    if_match: int | None,
) -> Decision:
    """Move a lock's amount into another wallet: both streams change in one atomic append.

    The payer's key needs access to the paying wallet only; the payee may belong to anyone."""
    wallet = await load_wallet(repo, ctx, wallet_id, expected_version=if_match)
    if to_wallet_id == wallet_id:
        to_wallet = wallet
    else:
        found = await repo.find(Wallet, to_wallet_id)
        if found is None:
            raise NotFound(f"wallet {to_wallet_id} does not exist")
        to_wallet = found
    wallet.settle(lock_id, to_wallet, ctx.now)
    body = {"lock_id": str(lock_id), **wallet_body(wallet, ctx), "to_wallet_id": str(to_wallet_id)}
    return Decision([wallet, to_wallet], body)


@dataclass(frozen=True, slots=True)
class Settle:
    """settle() as a message: it touches the paying wallet and the payee's."""

    repo: Repository
    wallet_id: UUID
    lock_id: UUID
    to_wallet_id: UUID
    if_match: int | None

    async def streams(self) -> Sequence[str]:
        return [wallet_stream(self.wallet_id), wallet_stream(self.to_wallet_id)]

    async def decide(self, ctx: CommandContext) -> Decision:
        return await settle(self.repo, ctx, self.wallet_id, self.lock_id, self.to_wallet_id, self.if_match)


async def reserve(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, amount: int, ttl_seconds: int, if_match: int | None,
    reservation_id: UUID | None = None,
) -> Decision:
    wallet = await load_wallet(repo, ctx, wallet_id, expected_version=if_match)
    reservation_id = reservation_id or uuid4()
    expires_at = ctx.now + timedelta(seconds=ttl_seconds)
    wallet.reserve(reservation_id, amount, expires_at, ctx.now)
    body = {"reservation_id": str(reservation_id), "expires_at": expires_at.isoformat(), **wallet_body(wallet, ctx)}
    return Decision([wallet], body)


async def confirm(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, reservation_id: UUID, amount: int | None,
    if_match: int | None,
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.confirm(reservation_id, ctx.now, amount),
                        reservation_id=str(reservation_id))


async def rollback(
    repo: Repository, ctx: CommandContext, wallet_id: UUID, reservation_id: UUID, if_match: int | None
) -> Decision:
    return await change(repo, ctx, wallet_id, if_match, lambda wallet: wallet.rollback(reservation_id, ctx.now),
                        reservation_id=str(reservation_id))


async def expire(repo: Repository, ctx: CommandContext, wallet_id: UUID, reservation_id: UUID) -> Decision:
    return await change(repo, ctx, wallet_id, None, lambda wallet: wallet.expire(reservation_id, ctx.now),
                        reservation_id=str(reservation_id))
