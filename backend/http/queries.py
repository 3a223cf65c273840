"""Read endpoints served from the read models (projections/), with read-your-writes
(backend/http/reading.py).

Every GET takes `min_position` (query) or `X-Min-Position` (header): it first waits, up to
`Prefer: wait=N` seconds (default READ_WAIT_DEFAULT_S, at most READ_WAIT_MAX_S), for the projection
behind it to reach that position, else answers 503 `unavailable` with Retry-After. Answers carry
`X-Projection-Position`, the checkpoint the answer reflects (read in the same statement as the
data). Figures are as of now: a reservation past its expires_at counts as expired everywhere.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from backend.appkeys import CLOCK, POOL
from backend.http import replies
from backend.http.auth import ACTOR
from backend.http.endpoint import JSON, Param, endpoint
from backend.http.problems import Problem
from backend.http.reading import answer, decode_cursor, page_limit, page_of, page_params, reach, read_one
from backend.http.replies import render
from backend.store.read_pools import connection
from backend.store.reads import Executor
from projections import balances, deposits, registry, reservations, stats, status

routes = web.RouteTableDef()


# ---------------------------------------------------------------- wallets


@routes.get("/v1/wallets/{wallet_id}")
@endpoint(scope="wallets:read", reply=replies.WalletDetail, reads_model=True, etag=True)
async def get_wallet(request: web.Request) -> web.Response:
    """A wallet with its open locks and reservations (ETag: its version)."""
    clock = request.app[CLOCK]
    checkpoint, wallet = await read_one(request, "wallet_id", "wallet", balances.Balances.name,
                                        lambda db, wallet_id: balances.get_wallet(db, wallet_id, clock.now()))
    # A reservation fell due unrecorded: a copy of this version from before its deadline is stale.
    return answer(request, wallet, checkpoint, version=wallet["version"], by_version_alone=not wallet.pop("due"))


@routes.get("/v1/wallets")
@endpoint(scope="wallets:read", reply=replies.WalletPage, reads_model=True, params=(
    Param("owner", "this owner's wallets (default: the key's owner; every owner's for admin keys)"),
    *page_params("wallets"),
))
async def list_wallets(request: web.Request) -> web.Response:
    """Page through wallets in wallet_id order."""
    actor = request[ACTOR]
    owner = request.query.get("owner") or None  # an empty parameter counts as absent
    if owner is None and not actor.allows("admin"):
        owner = actor.owner
    if owner is not None and not actor.can_act_for(owner):
        raise Problem(403, "forbidden", "this API key may only list its own owner's wallets")
    limit = page_limit(request)
    after = decode_cursor(request.query.get("cursor") or None)
    now = request.app[CLOCK].now()
    checkpoint, found = await reach(request, balances.Balances.name, balances.list_wallets, owner, after, limit + 1,
                                    now)
    return answer(request, page_of(found, limit, "wallet_id"), checkpoint)


# ---------------------------------------------------------------- reservations, deposits, stats, status


@routes.get("/v1/reservations/{reservation_id}")
@endpoint(scope="wallets:read", reply=replies.Reservation, reads_model=True)
async def get_reservation(request: web.Request) -> web.Response:
    """A reservation; one past its expires_at reads as expired even before the expiry is recorded."""
    clock = request.app[CLOCK]
    checkpoint, found = await read_one(request, "reservation_id", "reservation", reservations.Reservations.name,
                                       lambda db, reservation_id: reservations.get_reservation(db, reservation_id,
                                                                                           clock.now()))
    return answer(request, found, checkpoint)


@routes.get("/v1/deposits/{deposit_id}")
@endpoint(scope="wallets:read", reply=replies.Deposit, reads_model=True, etag=True)
async def get_deposit(request: web.Request) -> web.Response:
    """A deposit of one of the key's owner's wallets (ETag: its version)."""
    checkpoint, found = await read_one(request, "deposit_id", "deposit", deposits.Deposits.name,
                                       deposits.get_deposit)
    found.pop("owner")  # not part of a deposit's reply
    return answer(request, found, checkpoint, version=found["version"])


@routes.get("/v1/stats")
@endpoint(scope="wallets:read", reply=replies.Stats, reads_model=True)
async def get_stats(request: web.Request) -> web.Response:
    """Totals per currency and event counts, as of one instant of the stats read model."""
    now = request.app[CLOCK].now()

    async def read(db: Executor) -> tuple[int, dict[str, Any]]:
        async with connection(db) as conn:
            return await stats.get_stats(conn, now)

    checkpoint, body = await reach(request, stats.Stats.name, read)
    return answer(request, body, checkpoint)


@routes.get("/v1/projections")
@endpoint(scope="admin", reply=replies.Projections)
async def get_projections(request: web.Request) -> web.Response:
    """Each projection's checkpoint, lag, leader and failures."""
    found = await status.status(request.app[POOL], registry.names())
    body = render(replies.Projections, {"projections": [item.as_dict() for item in found]})
    return web.Response(body=body, content_type=JSON)
