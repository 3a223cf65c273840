"""CORS for pages on other origins (CORS_ALLOWED_ORIGINS, exact origins; empty: nothing changes).

A listed origin's preflight (OPTIONS with Access-Control-Request-Method) is answered here, before
authentication, with the methods and request headers the API takes. Every answer to a listed origin,
errors and streams included, names it in Access-Control-Allow-Origin and exposes the response headers
a client reads; that is added on ``on_response_prepare``, because a stream's headers go out inside its
handler. An unlisted origin gets no CORS header, so its browser withholds the answer. No cookies are
used (keys travel as Bearer tokens), so credentials are never allowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

ALLOW_METHODS = "GET, HEAD, POST, DELETE"
"""Every method the API routes (a test holds them equal)."""
ALLOW_HEADERS = ", ".join((
    "Authorization", "Content-Type", "Idempotency-Key", "If-Match", "If-None-Match", "X-Min-Position",
    "Last-Event-ID", "X-Request-ID", "X-Correlation-ID", "Prefer",
))
EXPOSE_HEADERS = ", ".join((
    "X-Position", "X-Projection-Position", "ETag", "Retry-After", "Idempotent-Replayed", "X-Request-ID",
    "Location", "X-Stream-Refused",
))
MAX_AGE_S = "600"


def cors_middleware(origins: frozenset[str]) -> Middleware:
    """Answers listed origins' preflights; any other request goes on (and an unlisted origin's
    preflight gets the ordinary answer to OPTIONS, without CORS headers)."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if (request.method == hdrs.METH_OPTIONS and origin in origins
                and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers):
            return web.Response(status=204, headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE_S,
                hdrs.VARY: "Origin",
            })
        return await handler(request)

    return cors


def cors_headers(origins: frozenset[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """For on_response_prepare: the allow and expose headers, for a listed origin only."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:
            return
        vary = response.headers.get(hdrs.VARY)
        if not vary:
            response.headers[hdrs.VARY] = "Origin"
        elif "origin" not in vary.lower():
            response.headers[hdrs.VARY] = f"{vary}, Origin"
        if origin in origins:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS

    return add
