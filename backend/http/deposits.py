"""Deposit endpoints: open a deposit, report its status, read it.

Answers are the deposit ``{deposit_id, wallet_id, currency, address, status, confirmations, amount,
chain_tx_id, failure_reason, version}``; writes add ``position`` and the resulting ``wallet``.
"""

from __future__ import annotations

from uuid import uuid4

from aiohttp import web

from backend.appkeys import REPOSITORY, SETTINGS
from backend.commands import deposits
from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from backend.domain import Deposit, deposit_stream
from backend.http import models, replies
from backend.http.commands import if_match, locate_created, run_command
from backend.http.endpoint import command
from backend.http.problems import Problem
from backend.http.wallets import path_uuid

routes = web.RouteTableDef()


@routes.post("/v1/deposits")
@command(models.OpenDeposit, scope="deposits:write", reply=replies.DepositWrite, status=201, conditional=False,
         errors=("not_found", "currency_mismatch"), creates="/v1/deposits/{deposit_id}")
async def open_deposit(request: web.Request, body: models.OpenDeposit) -> web.Response:
    """Open a deposit on a wallet: a fresh address to pay into, pending until the chain watcher reports."""
    deposit_id = uuid4()
    secret = request.app[SETTINGS].deposit_address_secret.get_secret_value().encode()
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await deposits.open_deposit(repo, ctx, deposit_id, body.wallet_id, body.currency, secret)

    response = await run_command(request, [deposit_stream(deposit_id)], decide)
    return locate_created(request, response)


@routes.post("/v1/deposits/{deposit_id}/status")
@command(models.DepositStatusChange, scope="deposits:admin", reply=replies.DepositWrite,
         errors=("invalid_transition",))
async def set_status(request: web.Request, body: models.DepositStatusChange) -> web.Response:
    """The chain watcher's report; `confirmed` credits the wallet once, in the same atomic append."""
    deposit_id = path_uuid(request, "deposit_id")
    version = if_match(request)
    repo = request.app[REPOSITORY]
    known = await repo.find(Deposit, deposit_id)
    if known is None:
        raise Problem(404, "not_found", f"deposit {deposit_id} does not exist")

    async def decide(ctx: CommandContext) -> Decision:
        return await deposits.set_status(
            repo, ctx, deposit_id, body.status, confirmations=body.confirmations, amount=body.amount,
            chain_tx_id=body.chain_tx_id, reason=body.reason, if_match=version,
        )

    streams = deposits.status_streams(known, body.status, body.chain_tx_id)
    return await run_command(request, streams, decide)
