"""Declaring an endpoint once: its scope, request body and reply model drive the handler and /openapi.json.

    @routes.post("/v1/wallets/{wallet_id}/debits")
    @command(models.Movement, scope="wallets:write", reply=replies.WalletWrite)
    async def debit(request: web.Request, body: models.Movement) -> web.Response: ...

The wrapper checks the scope (403 before anything else is read), parses and validates the body (422
naming the field), and leaves the declaration on the request, where run_command() and answer() find
the reply model that renders the answer. backend.http.openapi reads the same declarations off the
router, so the document describes exactly what the handlers enforce.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel

from backend.http.auth import require
from backend.http.bodies import read_json
from backend.http.problems import invalid_parameters

JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
MIN_POSITION = "min_position"
MIN_POSITION_HEADER = "X-Min-Position"
NONE: frozenset[str] = frozenset()

B = TypeVar("B", bound=BaseModel)
R = TypeVar("R", bound=web.StreamResponse)
Handler = Callable[[web.Request], Awaitable[R]]


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter or header the handler reads itself (documented, not validated here)."""

    name: str
    description: str
    schema: Mapping[str, object] = field(default_factory=lambda: {"type": "string"})
    location: str = "query"


@dataclass(frozen=True, slots=True)
class Header:
    """A response header the handler sets on its success answer (those every endpoint of a kind sends,
    such as X-Position on commands, backend.http.openapi adds itself)."""

    name: str
    description: str
    required: bool = True
    schema: Mapping[str, object] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    scope: str | None = None
    """The scope the wrapper requires; None: public, or the handler decides (see `access`)."""
    body: type[BaseModel] | None = None
    reply: type[BaseModel] | None = None
    status: int = 200
    content_type: str = JSON
    query: type[BaseModel] | None = None
    """A model the handler validates its query string with."""
    params: tuple[Param, ...] = ()
    access: str | None = None
    """How the handler authorizes, where a single scope does not say it."""
    conditional: bool = False
    """Takes If-Match: <version> (412 precondition_failed on a mismatch)."""
    reads_model: bool = False
    """Served from a read model: takes min_position / X-Min-Position and Prefer: wait=N."""
    public: bool = False
    errors: tuple[str, ...] = ()
    """The domain error codes the command can answer with, besides those every command can."""
    frames: str | None = None
    """A stream's: the component schema (backend.streaming.schemas) of its event frames' data."""
    creates: str | None = None
    """A 201's Location: the path of what it created, its placeholders filled from the answer's fields."""
    etag: bool = False
    """Answers carry ETag: "<version>" and take If-None-Match (304 when it matches)."""
    headers: tuple[Header, ...] = ()
    """Further headers of the success answer."""

    @property
    def query_parameters(self) -> frozenset[str]:
        """The query parameters the handler reads itself (a query model checks its own)."""
        names = {param.name for param in self.params if param.location == "query"}
        if self.reads_model:
            names.add(MIN_POSITION)
        return frozenset(names)


ENDPOINT = web.RequestKey("endpoint", Endpoint)
ATTRIBUTE = "tally_endpoint"


def declared(handler: object) -> Endpoint | None:
    """The declaration of a route's handler, if it was declared with endpoint() or command()."""
    found = getattr(handler, ATTRIBUTE, None)
    return found if isinstance(found, Endpoint) else None


def endpoint(
    *, scope: str | None = None, reply: type[BaseModel] | None = None, status: int = 200,
    content_type: str = JSON, query: type[BaseModel] | None = None, params: tuple[Param, ...] = (),
    access: str | None = None, conditional: bool = False, reads_model: bool = False, public: bool = False,
    errors: tuple[str, ...] = (), frames: str | None = None, etag: bool = False, headers: tuple[Header, ...] = (),
) -> Callable[[Handler[R]], Handler[R]]:
    """A handler without a request body; the arguments are Endpoint's fields."""
    spec = Endpoint(scope=scope, reply=reply, status=status, content_type=content_type, query=query,
                    params=params, access=access, conditional=conditional, reads_model=reads_model,
                    public=public, errors=errors, frames=frames, etag=etag, headers=headers)

    known = None if public or query is not None else spec.query_parameters

    def wrap(handler: Handler[R]) -> Handler[R]:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> R:
            if spec.scope is not None:
                require(request, spec.scope)
            if known is not None:
                refuse_unknown_parameters(request, known)
            request[ENDPOINT] = spec
            return await handler(request)

        setattr(checked, ATTRIBUTE, spec)
        return checked

    return wrap


def command(
    body: type[B], *, scope: str, reply: type[BaseModel], status: int = 200, conditional: bool = True,
    errors: tuple[str, ...] = (), creates: str | None = None,
) -> Callable[[Callable[[web.Request, B], Awaitable[R]]], Handler[R]]:
    """A handler of a JSON body, called with the validated model (an empty body reads as {})."""
    spec = Endpoint(scope=scope, body=body, reply=reply, status=status, conditional=conditional, errors=errors,
                    creates=creates)

    def wrap(handler: Callable[[web.Request, B], Awaitable[R]]) -> Handler[R]:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> R:
            require(request, scope)
            refuse_unknown_parameters(request, NONE)
            parsed = await read_json(request, body)
            request[ENDPOINT] = spec
            return await handler(request, parsed)

        setattr(checked, ATTRIBUTE, spec)
        return checked

    return wrap


def refuse_unknown_parameters(request: web.Request, known: frozenset[str]) -> None:
    """400 for a query parameter the endpoint does not take: a misspelt `min_position` must not
    quietly turn a read-your-writes read into a plain one. Public endpoints take whatever is sent."""
    if not request.query_string:
        return
    unknown = sorted(set(request.query) - known)
    if unknown:
        raise invalid_parameters(*((name, "this endpoint takes no such query parameter") for name in unknown))


def reply_model(request: web.Request) -> type[BaseModel]:
    """The reply model its endpoint declared (a handler without one is a programming error)."""
    reply = request[ENDPOINT].reply if ENDPOINT in request else None
    if reply is None:
        raise LookupError(f"{request.method} {request.path}: the endpoint declares no reply model")
    return reply
