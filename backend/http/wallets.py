"""Wallet endpoints (DESIGN.md section 8): open, read, credit, debit, locks, reservations."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from uuid import UUID, uuid4

from aiohttp import web

from backend.appkeys import REPOSITORY
from backend.commands import wallets
from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from backend.domain import wallet_stream
from backend.http import models
from backend.http.auth import require
from backend.http.bodies import read_json
from backend.http.commands import if_match, locate_created, run_command
from backend.http.problems import Problem
from backend.store.repository import Repository

routes = web.RouteTableDef()


@functools.lru_cache(maxsize=16_384)
def parse_uuid(text: str) -> UUID:
    """UUID(text), memoized: the same wallet ids come back request after request, and UUID() parses in
    Python (a malformed text raises each time; exceptions are not cached)."""
    return UUID(text)


def path_uuid(request: web.Request, name: str) -> UUID:
    try:
        return parse_uuid(request.match_info[name])
    except ValueError:
        raise Problem(404, "not_found", f"{name} must be a UUID") from None


@routes.post("/v1/wallets")
async def open_wallet(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    body = await read_json(request, models.OpenWallet)
    wallet_id = uuid4()
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await wallets.open_wallet(repo, ctx, wallet_id, body.owner, body.currency)

    response = await run_command(request, [wallet_stream(wallet_id)], decide)
    return locate_created(response, "/v1/wallets", "wallet_id")


WalletCommand = Callable[[Repository, CommandContext, UUID, int | None], Awaitable[Decision]]


async def on_wallet(request: web.Request, command: WalletCommand, also: Sequence[str] = ()) -> web.Response:
    """Run command(repo, ctx, wallet_id, If-Match version) on the path's wallet (and the `also` streams)."""
    wallet_id = path_uuid(request, "wallet_id")
    version = if_match(request)
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await command(repo, ctx, wallet_id, version)

    return await run_command(request, [wallet_stream(wallet_id), *also], decide)


@routes.post("/v1/wallets/{wallet_id}/credits")
async def credit(request: web.Request) -> web.Response:
    require(request, "admin")
    body = await read_json(request, models.Movement)
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.credit(repo, ctx, wid, body.amount,
                                                                             body.reference, v))


@routes.post("/v1/wallets/{wallet_id}/debits")
async def debit(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    body = await read_json(request, models.Movement)
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.debit(repo, ctx, wid, body.amount,
                                                                            body.reference, v))


@routes.post("/v1/wallets/{wallet_id}/locks")
async def lock(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    body = await read_json(request, models.LockFunds)
    lock_id = uuid4()
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.lock(repo, ctx, wid, lock_id, body.amount,
                                                                           body.reason, v))


@routes.post("/v1/wallets/{wallet_id}/locks/{lock_id}/release")
async def release(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    lock_id = path_uuid(request, "lock_id")
    await read_json(request, models.Empty)
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.release(repo, ctx, wid, lock_id, v))


@routes.post("/v1/wallets/{wallet_id}/locks/{lock_id}/settle")
async def settle(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    lock_id = path_uuid(request, "lock_id")
    body = await read_json(request, models.Settle)
    return await on_wallet(
        request,
        lambda repo, ctx, wid, v: wallets.settle(repo, ctx, wid, lock_id, body.to_wallet_id, v),
        also=[wallet_stream(body.to_wallet_id)],
    )


@routes.post("/v1/wallets/{wallet_id}/reservations")
async def reserve(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    body = await read_json(request, models.Reserve)
    reservation_id = uuid4()
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.reserve(
        repo, ctx, wid, body.amount, body.ttl_seconds, v, reservation_id))


@routes.post("/v1/wallets/{wallet_id}/reservations/{reservation_id}/confirm")
async def confirm(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    reservation_id = path_uuid(request, "reservation_id")
    body = await read_json(request, models.Confirm)
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.confirm(
        repo, ctx, wid, reservation_id, body.amount, v))


@routes.post("/v1/wallets/{wallet_id}/reservations/{reservation_id}/rollback")
async def rollback(request: web.Request) -> web.Response:
    require(request, "wallets:write")
    reservation_id = path_uuid(request, "reservation_id")
    await read_json(request, models.Empty)
    return await on_wallet(request, lambda repo, ctx, wid, v: wallets.rollback(repo, ctx, wid, reservation_id, v))
