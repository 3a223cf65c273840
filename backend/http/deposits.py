"""Deposit endpoints: open a deposit, report its status, read it.

Answers are the deposit ``{deposit_id, wallet_id, currency, address, status, confirmations, amount,
chain_tx_id, failure_reason, version}``; writes add ``position`` and the resulting ``wallet``.
"""

from __future__ import annotations

from uuid import uuid4

from aiohttp import web

from backend.appkeys import DEPOSIT_COMMANDS
from backend.http import models, replies
from backend.http.commands import if_match, locate_created, run_command
from backend.http.endpoint import command
from backend.http.path_ids import path_uuid

routes = web.RouteTableDef()


@routes.post("/v1/deposits")
@command(models.OpenDeposit, scope="deposits:write", reply=replies.DepositWrite, status=201, conditional=False,
         errors=("not_found", "currency_mismatch"), creates="/v1/deposits/{deposit_id}")
async def open_deposit(request: web.Request, body: models.OpenDeposit) -> web.Response:
    """Open a deposit on a wallet: a fresh address to pay into, pending until the chain watcher reports."""
    message = request.app[DEPOSIT_COMMANDS].open(uuid4(), body.wallet_id, body.currency)
    return locate_created(request, await run_command(request, message))


@routes.post("/v1/deposits/{deposit_id}/status")
@command(models.DepositStatusChange, scope="deposits:admin", reply=replies.DepositWrite,
         errors=("invalid_transition",))
async def set_status(request: web.Request, body: models.DepositStatusChange) -> web.Response:
    """The chain watcher's report; `confirmed` credits the wallet once, in the same atomic append."""
    deposit_id = path_uuid(request, "deposit_id")
    message = request.app[DEPOSIT_COMMANDS].set_status(
        deposit_id, body.status, confirmations=body.confirmations, amount=body.amount,
        chain_tx_id=body.chain_tx_id, reason=body.reason, if_match=if_match(request),
    )
    return await run_command(request, message)
