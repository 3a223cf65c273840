"""Authentication (Bearer API keys) and authorization helpers for handlers."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from backend.appkeys import AUTH_FAILURES, AUTHENTICATOR, STREAM_TOKENS
from backend.commands.context import Actor
from backend.http.problems import Problem, invalid_parameters
from backend.http.signed_tokens import PREFIX as STREAM_TOKEN_PREFIX

ACTOR = web.RequestKey("actor", Actor)

PUBLIC_PREFIXES = ("/health/", "/metrics", "/openapi.json", "/dashboard", "/docs")
"""/dashboard and /docs: static pages (backend.http.static); the dashboard asks for a key itself."""
STREAM_PATHS = "/v1/streams/"
"""Browsers' EventSource cannot send headers, so GETs under this prefix (the SSE streams) may carry
a token as ``?access_token=`` instead (RFC 6750 section 2.3): preferably a short-lived stream token
(backend.http.stream_tokens), an API key being discouraged. Logs record ``request.path``, which has
no query string, so the token is never logged."""
SSE = "text/event-stream"


def bearer_token(request: web.Request) -> str | None:
    """The credential the request carries. Authorization holds one (RFC 9110, 11.6.2): with several,
    a proxy or log in front that reads another one than the first would judge another caller, so
    such a request is refused (400) before any key is looked at."""
    headers = request.headers
    header = headers.get("Authorization", "")
    if header and len(headers.getall("Authorization")) > 1:
        raise invalid_parameters(("Authorization", "send one Authorization header, not several"))
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.method == "GET" and request.path.startswith(STREAM_PATHS):
        return request.query.get("access_token", "").strip() or None
    return None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The caller's Actor on the request, or 401; 429 from an address that failed too often
    (backend.http.auth_failures), unless its key is already cached."""
    if request.path.startswith(PUBLIC_PREFIXES) or request.match_info.http_exception is not None:
        return await handler(request)
    token = bearer_token(request)
    if token is not None and token.startswith(STREAM_TOKEN_PREFIX):
        actor = await stream_token_actor(request, token)
    else:
        app = request.app
        authenticator = app[AUTHENTICATOR]
        found = authenticator.authenticate_cached(token) if token is not None else None
        if isinstance(found, Actor):  # a key this process knows: the common case, nothing more to do
            actor = found
        elif (failures := app.get(AUTH_FAILURES)) is not None:
            actor = await failures.uncached(request, authenticator, token, found)
        else:
            actor = await authenticator.authenticate(token) if token is not None else None
    if actor is None:
        if token is None:
            raise Problem(401, "unauthorized", "send an API key as 'Authorization: Bearer <key>'",
                          headers={"WWW-Authenticate": 'Bearer realm="tally"'})
        raise invalid_key()
    request[ACTOR] = actor
    return await handler(request)


def invalid_key() -> Problem:
    """401 for a key that was sent but opens nothing (also for one revoked while its stream was admitted)."""
    return Problem(401, "unauthorized", "the API key is unknown, expired or revoked",
                   headers={"WWW-Authenticate": 'Bearer realm="tally", error="invalid_token"'})


def require(request: web.Request, scope: str) -> Actor:
    """The caller, if its key holds scope (admin holds every scope); 403 otherwise."""
    actor = request[ACTOR]
    if not actor.allows(scope):
        raise Problem(403, "forbidden", f"this API key lacks the '{scope}' scope")
    return actor


def opens_stream(request: web.Request) -> bool:
    """A GET of an SSE endpoint (its declaration says text/event-stream), the one use of stream tokens."""
    spec = getattr(request.match_info.handler, "tally_endpoint", None)
    return request.method == "GET" and getattr(spec, "content_type", None) == SSE


async def stream_token_actor(request: web.Request, token: str) -> Actor | None:
    """The Actor of a genuine, unexpired stream token whose key is still valid, if the request opens
    a stream (403 otherwise); None: 401."""
    key_id = request.app[STREAM_TOKENS].verify(token)
    if key_id is None:
        return None
    if not opens_stream(request):
        raise Problem(403, "forbidden", "a stream token only opens streams (GET /v1/streams/events, "
                      "/v1/streams/wallets/{wallet_id}, /v1/streams/dashboard); send an API key here")
    return await request.app[AUTHENTICATOR].actor_of(key_id)
