"""POST /v1/stream-tokens: what a browser puts in an EventSource URL instead of its API key.

Any valid key gets a token that opens streams with that key's owner and scopes until ``expires_at``
(STREAM_TOKEN_TTL_S), as often as needed, and authorizes nothing else (backend.http.auth). It is
stateless (backend.http.signed_tokens); the key behind it is looked up when a stream opens, so a
revoked key's tokens stop at once (and the hub ends the key's open streams, as when the key expires),
while a stream already open is not cut when its token expires.
"""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from backend.appkeys import STREAM_TOKENS
from backend.http import replies
from backend.http.auth import ACTOR
from backend.http.endpoint import JSON, Header, endpoint, reply_model

routes = web.RouteTableDef()


@routes.post("/v1/stream-tokens")
@endpoint(reply=replies.StreamToken, access="any API key; the token opens streams with that key's owner and "
          "scopes, as ?access_token=, until expires_at, and is refused everywhere else",
          headers=(Header("Cache-Control", "no-store: the token is a credential"),))
async def create_stream_token(request: web.Request) -> web.Response:
    """A short-lived token for EventSource URLs, so that no long-lived API key travels in a URL."""
    tokens = request.app[STREAM_TOKENS]
    token, expires_at = tokens.issue(UUID(request[ACTOR].key_id))
    body = replies.render(reply_model(request), {"token": token, "expires_at": expires_at})
    return web.Response(body=body, content_type=JSON, headers={"Cache-Control": "no-store"})
