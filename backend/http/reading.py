"""What every read endpoint shares: read-your-writes (wait for `min_position`, read from a replica or the
primary, answer with the checkpoint the data reflects and an ETag), the row-or-404/403 lookup, and
keyset paging. A module of its own so that handler modules (backend/http/queries.py,
backend/http/api_keys.py) use it without importing each other.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar
from uuid import UUID

from aiohttp import web

from backend.appkeys import PROJECTIONS, READ_POOLS, SETTINGS
from backend.http.auth import ACTOR
from backend.http.endpoint import JSON, MIN_POSITION, MIN_POSITION_HEADER, Param, reply_model
from backend.http.integers import parse_int
from backend.http.path_ids import path_uuid
from backend.http.positions import check_within_log
from backend.http.problems import Problem, invalid_parameters
from backend.http.replies import render
from backend.store.events import MAX_POSITION
from backend.store.read_pools import Replica, by_deadline
from backend.store.reads import Executor
from projections.waiting import poll_checkpoint

POSITION_HEADER = "X-Projection-Position"
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
T = TypeVar("T")
P = ParamSpec("P")
ReadModel = Callable[Concatenate[Executor, P], Awaitable[tuple[int, T]]]
"""A read model's query, given where to read and its arguments: (the checkpoint it reflects, read in the
same statement, and the data)."""
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


# ---------------------------------------------------------------- read-your-writes


def min_position(request: web.Request) -> tuple[str, int] | None:
    """The position to wait for, and where it was given (the query parameter wins over the header; a
    malformed one is a 400 either way, not ignored)."""
    found = None
    for field, raw in ((MIN_POSITION_HEADER, request.headers.get(MIN_POSITION_HEADER)),
                       (MIN_POSITION, request.query.get(MIN_POSITION))):
        if raw is not None:
            found = field, parse_int(raw, field, maximum=MAX_POSITION,
                                     message="must be a non-negative integer of ASCII digits (a write's position)")
    return found


def wait_budget(request: web.Request) -> float:
    settings = request.app[SETTINGS]
    match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
    wanted = float(match[1]) if match else settings.read_wait_default_s
    return min(wanted, settings.read_wait_max_s)


async def reach(request: web.Request, projection: str, read: ReadModel[P, T], *args: P.args,
                **kwargs: P.kwargs) -> tuple[int, T]:
    """`read(db, *args, **kwargs)` (a read model's query, answering (checkpoint, data)) once `projection`
    has applied min_position, if the request names one, from a read replica when one is in use (else the
    primary). The arguments are passed on, not closed over: without replicas, a read makes no closure.

    With a min_position and a replica: the replica's checkpoint is polled until it has the position,
    within the request's wait budget; past it (or if the replica fails) the primary answers, once its
    own checkpoint has the position, else 503 as without replicas. A replica whose last measured lag
    already exceeds the budget is not waited for. A read never answers older than the position it
    asked for, and never waits past its budget."""
    pools = request.app[READ_POOLS]
    wanted = min_position(request)
    if wanted is None:
        if not pools.replicas:
            return await read(pools.primary, *args, **kwargs)
        return await pools.read(lambda db: read(db, *args, **kwargs))
    field, position = wanted
    await check_within_log(request.app, position, field)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_budget(request)
    replica = pools.pick()
    if replica is not None and (replica.lag_s or 0.0) < deadline - loop.time():
        async def from_replica(replica: Replica) -> tuple[int, T] | None:
            async with pools.attempt(replica):
                if await poll_checkpoint(replica.pool, projection, position, deadline - loop.time()) >= position:
                    found = await read(replica.pool, *args, **kwargs)
                    if found[0] >= position:  # checked in the answer's own statement (a replica may restart)
                        replica.reads += 1
                        return found
            return None

        # the budget bounds the replica's part too: one that hangs (its queries never return) is left to
        # its check, and the primary answers at the deadline
        if (found := await by_deadline(deadline, from_replica(replica))) is not None:
            return found
    seen = await request.app[PROJECTIONS].watcher.wait_for(projection, position, max(0.0, deadline - loop.time()))
    if seen < position:
        raise Problem(
            503, "unavailable",
            f"the {projection} read model is at position {seen}, not yet at {position}; retry shortly",
            headers={"Retry-After": "1", POSITION_HEADER: str(seen)},
            extra={"projection": projection, "position": seen, "min_position": position},
        )
    return await read(pools.primary, *args, **kwargs)


def answer(request: web.Request, body: dict[str, Any], checkpoint: int, *, version: int | None = None,
           by_version_alone: bool = True) -> web.Response:
    """body as the endpoint's reply model, with the checkpoint it reflects; if versioned, its ETag, and
    304 without a body when If-None-Match names that version (the client's copy is current), unless
    the body is not determined by the version alone (by_version_alone=False: it changed with the clock)."""
    headers = {POSITION_HEADER: str(checkpoint)}
    if version is not None:
        headers["ETag"] = etag = f'"{version}"'
        if by_version_alone and none_match(request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers=headers)
    return web.Response(body=render(reply_model(request), body), content_type=JSON, headers=headers)


def none_match(header: str | None, etag: str) -> bool:
    """Whether If-None-Match matches etag: `*`, or any tag of the list by weak comparison (RFC 9110
    13.1.2: W/"3" matches "3"). A malformed header matches nothing, so the answer is a full 200."""
    if header is None:
        return False
    tags = [tag.strip() for tag in header.split(",")]
    return "*" in tags or etag in (tag.removeprefix("W/") for tag in tags)


def not_found(what: str, checkpoint: int) -> Problem:
    return Problem(404, "not_found", f"{what} does not exist", headers={POSITION_HEADER: str(checkpoint)})


def forbidden(what: str) -> Problem:
    return Problem(403, "forbidden", f"{what} belongs to another owner")


Found = tuple[int, dict[str, Any] | None]
"""A read model's (checkpoint, the row asked for, or None)."""


async def read_one(request: web.Request, param: str, what: str, projection: str,
                   get: Callable[[Executor, UUID], Awaitable[Found]]) -> tuple[int, dict[str, Any]]:
    """The row named by the path parameter `param`, read from a projection once it has reached what the
    caller asked for, if the caller may see it: 404 (at the checkpoint) when there is none, 403 when it
    belongs to an owner the key does not act for. With the checkpoint it was read at."""
    item_id = path_uuid(request, param)
    checkpoint, found = await reach(request, projection, get, item_id)
    if found is None:
        raise not_found(f"{what} {item_id}", checkpoint)
    if not request[ACTOR].can_act_for(found["owner"]):
        raise forbidden(f"{what} {item_id}")
    return checkpoint, found


# ---------------------------------------------------------------- paging


def page_params(what: str) -> tuple[Param, Param]:
    """`cursor` and `limit`, as every list endpoint names them."""
    return (Param("cursor", "next_cursor of the previous page (absent: the first page)"),
            Param("limit", f"{what} per page", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                                "default": DEFAULT_LIMIT}))


def page_of(found: list[dict[str, Any]], limit: int, id_field: str) -> dict[str, Any]:
    """The list answer of up to limit + 1 rows read in id order: the first `limit` of them, and the cursor
    of the last when there was one more."""
    more = len(found) > limit
    data = found[:limit]
    return {"data": data, "has_more": more,
            "next_cursor": encode_cursor(UUID(str(data[-1][id_field]))) if more else None}


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    return parse_int(raw, "limit", minimum=1, maximum=MAX_LIMIT)


def encode_cursor(last: UUID) -> str:
    """Opaque to clients: the last id of the page (keyset pagination)."""
    return base64.urlsafe_b64encode(last.bytes).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> UUID | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise invalid_parameters(("cursor", "is not one this API returned")) from None
