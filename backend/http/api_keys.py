"""API key endpoints, all for `admin` keys: create, list, read, revoke."""

from __future__ import annotations

import orjson
from aiohttp import web

from backend.appkeys import AUTHENTICATOR, REPOSITORY
from backend.commands import api_keys
from backend.commands.bus import Call, Decision
from backend.commands.context import CommandContext
from backend.domain import apikey_stream
from backend.http import models, replies
from backend.http.commands import if_match, locate_created, run_command
from backend.http.endpoint import Param, command, endpoint
from backend.http.path_ids import path_uuid
from backend.http.reading import answer, decode_cursor, page_limit, page_of, page_params, reach, read_one
from projections import api_keys as api_keys_model

routes = web.RouteTableDef()


@routes.post("/v1/api-keys")
@command(models.CreateApiKey, scope="admin", reply=replies.CreatedApiKey, status=201, conditional=False,
         creates="/v1/api-keys/{key_id}")
async def create_key(request: web.Request, body: models.CreateApiKey) -> web.Response:
    """Create an API key: 201 with the token as `secret`, in this response only.

    An Idempotency-Key replay answers the same key without `secret`: the stored reply never holds
    the token, so the database keeps only its hash. A client that lost it revokes and creates again.
    """
    key_id, token = api_keys.new_token()
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await api_keys.create_key(repo, ctx, key_id, token, body.owner, body.name, body.scopes,
                                         body.expires_at)

    response = await run_command(request, Call([apikey_stream(key_id)], decide))
    if response.status == 201:
        request.app[AUTHENTICATOR].mark_created(key_id)
    if response.status == 201 and "Idempotent-Replayed" not in response.headers:
        created = orjson.loads(response.body)  # type: ignore[arg-type]
        response.body = replies.render(replies.CreatedApiKey, {**created, "secret": token})
    return locate_created(request, response)


@routes.get("/v1/api-keys")
@endpoint(scope="admin", reply=replies.ApiKeyPage, reads_model=True,
          params=(Param("owner", "only this owner's keys (default: every owner's)"), *page_params("keys")))
async def list_keys(request: web.Request) -> web.Response:
    """Page through keys, without secrets, oldest first, from the api_keys read model."""
    owner = request.query.get("owner") or None
    limit = page_limit(request)
    after = decode_cursor(request.query.get("cursor") or None)
    checkpoint, keys = await reach(request, api_keys_model.ApiKeys.name, api_keys_model.list_keys, owner, after,
                                   limit + 1)
    return answer(request, page_of(keys, limit, "key_id"), checkpoint)


@routes.get("/v1/api-keys/{key_id}")
@endpoint(scope="admin", reply=replies.ApiKey, reads_model=True, etag=True)
async def get_key(request: web.Request) -> web.Response:
    """A key, without its secret (ETag: its version, the If-Match of a revocation)."""
    checkpoint, key = await read_one(request, "key_id", "API key", api_keys_model.ApiKeys.name,  # admin: any owner
                                     api_keys_model.get_key)
    return answer(request, key, checkpoint, version=key["version"])


@routes.delete("/v1/api-keys/{key_id}")
@endpoint(scope="admin", reply=replies.ApiKeyWrite, status=204, conditional=True, errors=("invalid_transition",))
async def revoke_key(request: web.Request) -> web.Response:
    """Revoke a key: 204; it stops working in this process at once and in every other within a second."""
    key_id = path_uuid(request, "key_id")
    version = if_match(request)
    repo = request.app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        return await api_keys.revoke_key(repo, ctx, key_id, version)

    response = await run_command(request, Call([apikey_stream(key_id)], decide))
    if response.status >= 300:
        return response
    request.app[AUTHENTICATOR].mark_revoked(key_id)
    return web.Response(status=204, headers={k: v for k, v in response.headers.items()
                                             if k in ("X-Position", "Idempotent-Replayed")})
