"""Wallet endpoints: open, read, credit, debit, locks, reservations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from uuid import UUID, uuid4

from aiohttp import web

from backend.appkeys import REPOSITORY
from backend.commands import wallets
from backend.commands.bus import Call, Command, Decision
from backend.commands.context import CommandContext
from backend.domain import wallet_stream
from backend.http import models, replies
from backend.http.commands import if_match, locate_created, run_command
from backend.http.endpoint import command
from backend.http.path_ids import path_uuid
from backend.store.repository import Repository

routes = web.RouteTableDef()


@routes.post("/v1/wallets")
@command(models.OpenWallet, scope="wallets:write", reply=replies.WalletWrite, status=201, conditional=False,
         creates="/v1/wallets/{wallet_id}")
async def open_wallet(request: web.Request, body: models.OpenWallet) -> web.Response:
    """Open a wallet for an owner in a currency, with nothing in it."""
    wallet_id = uuid4()
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await wallets.open_wallet(repo, ctx, wallet_id, body.owner, body.currency)

    response = await run_command(request, Call([wallet_stream(wallet_id)], decide))
    return locate_created(request, response)


WalletCommand = Callable[[Repository, CommandContext, UUID, int | None], Awaitable[Decision]]


async def on_wallet(request: web.Request, command: WalletCommand) -> web.Response:
    """Run command(repo, ctx, wallet_id, If-Match version) on the path's wallet."""
    wallet_id = path_uuid(request, "wallet_id")
    version = if_match(request)
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await command(repo, ctx, wallet_id, version)

    return await run_command(request, Call([wallet_stream(wallet_id)], decide))


@routes.post("/v1/wallets/{wallet_id}/credits")
@command(models.Movement, scope="admin", reply=replies.WalletWrite)
async def credit(request: web.Request, body: models.Movement) -> web.Response:
    """Add money to a wallet (an operator's correction or a transfer in from outside Tally)."""
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.credit(repo, ctx, wid, body.amount,
                                                                             body.reference, v))


@routes.post("/v1/wallets/{wallet_id}/debits")
@command(models.Movement, scope="wallets:write", reply=replies.WalletWrite,
         errors=("insufficient_funds",))
async def debit(request: web.Request, body: models.Movement) -> web.Response:
    """Take money out of a wallet's available funds (422 insufficient_funds beyond them)."""
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.debit(repo, ctx, wid, body.amount,
                                                                            body.reference, v))


@routes.post("/v1/wallets/{wallet_id}/locks")
@command(models.LockFunds, scope="wallets:write", reply=replies.LockWrite, status=201,
         errors=("insufficient_funds",))
async def lock(request: web.Request, body: models.LockFunds) -> web.Response:
    """Hold an amount in escrow until it is released or settled."""
    lock_id = uuid4()
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.lock(repo, ctx, wid, lock_id, body.amount,
                                                                           body.reason, v))


@routes.post("/v1/wallets/{wallet_id}/locks/{lock_id}/release")
@command(models.Empty, scope="wallets:write", reply=replies.LockWrite,
         errors=("lock_not_open",))
async def release(request: web.Request, _: models.Empty) -> web.Response:
    """Return a lock's amount to the wallet's available funds."""
    lock_id = path_uuid(request, "lock_id")
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.release(repo, ctx, wid, lock_id, v))


@routes.post("/v1/wallets/{wallet_id}/locks/{lock_id}/settle")
@command(models.Settle, scope="wallets:write", reply=replies.SettleWrite,
         errors=("lock_not_open", "same_wallet", "currency_mismatch"))
async def settle(request: web.Request, body: models.Settle) -> web.Response:
    """Pay a lock's amount into another wallet of the same currency, both in one atomic append."""
    lock_id = path_uuid(request, "lock_id")
    message: Command = wallets.Settle(request.app[REPOSITORY], path_uuid(request, "wallet_id"), lock_id,
                                      body.to_wallet_id, if_match(request))
    return await run_command(request, message)


@routes.post("/v1/wallets/{wallet_id}/reservations")
@command(models.Reserve, scope="wallets:write", reply=replies.ReserveWrite, status=201,
         errors=("insufficient_funds",), creates="/v1/reservations/{reservation_id}")
async def reserve(request: web.Request, body: models.Reserve) -> web.Response:
    """Reserve credit until expires_at; confirm or roll it back before then, or it expires."""
    reservation_id = uuid4()
    return locate_created(request, await on_wallet(request, lambda repo, ctx, wid, v: wallets.reserve(
        repo, ctx, wid, body.amount, body.ttl_seconds, v, reservation_id)))


@routes.post("/v1/wallets/{wallet_id}/reservations/{reservation_id}/confirm")
@command(models.Confirm, scope="wallets:write", reply=replies.ReservationWrite,
         errors=("reservation_not_open", "reservation_expired", "amount_exceeds_reserved"))
async def confirm(request: web.Request, body: models.Confirm) -> web.Response:
    """Spend a reservation (all of it, or `amount` of it; the rest returns to available)."""
    reservation_id = path_uuid(request, "reservation_id")
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.confirm(
        repo, ctx, wid, reservation_id, body.amount, v))


@routes.post("/v1/wallets/{wallet_id}/reservations/{reservation_id}/rollback")
@command(models.Empty, scope="wallets:write", reply=replies.ReservationWrite,
         errors=("reservation_not_open", "reservation_expired"))
async def rollback(request: web.Request, _: models.Empty) -> web.Response:
    """Return a reservation to the wallet's available funds."""
    reservation_id = path_uuid(request, "reservation_id")
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.rollback(repo, ctx, wid, reservation_id, v))
