"""Audit endpoints, all behind the `audit:read` scope: history pages, the NDJSON
export, a wallet's state at a past position or time, and hash-chain verification."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from backend.appkeys import CLOCK, POOL, REPOSITORY
from backend.audit import history
from backend.audit.export import export_pages
from backend.audit.verify import head, verify_database
from backend.domain import Wallet
from backend.http import replies
from backend.http.bodies import field_errors
from backend.http.endpoint import JSON, Header, endpoint
from backend.http.integers import AsciiInt
from backend.http.middlewares import REQUEST_ID, REQUEST_ID_HEADER
from backend.http.models import Rfc3339
from backend.http.positions import check_within_log
from backend.http.problems import Problem, invalid_parameters
from backend.http.wallets import path_uuid
from backend.store.events import MAX_POSITION, MAX_STREAM_ID_LENGTH, MAX_TYPE_LENGTH

routes = web.RouteTableDef()

SCOPE = "audit:read"
NDJSON = "application/x-ndjson"
MAX_VERSION = 2**31 - 1

Position = Annotated[AsciiInt, Field(ge=0, le=MAX_POSITION)]
Limit = Annotated[AsciiInt, Field(ge=1, le=1000)]
StreamId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STREAM_ID_LENGTH)]

RECORDED_AT_SQL = "select recorded_at from events where position <= $1 order by position desc limit 1"


class Query(BaseModel):
    """Query parameters: strings converted (lax), unknown parameters rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LogQuery(Query):
    cursor: Annotated[Position, Field(description="next_cursor of the previous page: a position, the page "
                                                  "starts after it (default 0: the start of the log)")] = 0
    limit: Limit = 100
    types: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TYPE_LENGTH)]] | None = None
    stream_prefix: StreamId | None = None
    from_time: Rfc3339 | None = None
    to_time: Rfc3339 | None = None

    @field_validator("types", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value


class StreamQuery(Query):
    cursor: Annotated[AsciiInt, Field(ge=0, le=MAX_VERSION, description="next_cursor of the previous page: a "
                                      "version, the page starts after it (default 0: the first event)")] = 0
    limit: Limit = 100


class ExportQuery(Query):
    after: Position = 0
    to: Position | None = None


class StateQuery(Query):
    at_position: Annotated[AsciiInt, Field(ge=1, le=MAX_POSITION)] | None = None
    as_of: Rfc3339 | None = None


class VerifyQuery(Query):
    stream: StreamId | None = None


M = TypeVar("M", bound=Query)


def query(request: web.Request, model: type[M]) -> M:
    """The query string as `model`; an empty value counts as absent, a repeated parameter is an error."""
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise invalid_parameters((name, "give this parameter once"))
        if value != "":
            values[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid_parameters(*((e["field"], e["message"]) for e in field_errors(exc))) from None


def json_body(events: list[bytes], **fields: Any) -> web.Response:
    """A page of events already encoded by event_json, as `data`: spliced in, not decoded and validated
    again (a test holds these pages to replies.EventPage and replies.StreamPage)."""
    body = orjson.dumps({"data": [orjson.Fragment(e) for e in events], **fields})
    return web.Response(body=body, content_type=JSON)


@routes.get("/v1/events")
@endpoint(scope=SCOPE, reply=replies.EventPage, query=LogQuery)
async def log_events(request: web.Request) -> web.Response:
    """A page of the global log in position order, optionally filtered."""
    q = query(request, LogQuery)
    async with request.app[POOL].acquire() as conn:
        page = await history.log_page(conn, after=q.cursor, limit=q.limit, types=q.types,
                                      stream_prefix=q.stream_prefix, from_time=q.from_time, to_time=q.to_time)
    return json_body(page.events, has_more=page.has_more, next_cursor=str(page.next), head=page.head)


@routes.get("/v1/streams/{stream_id}/events")
@endpoint(scope=SCOPE, reply=replies.StreamPage, query=StreamQuery)
async def stream_events(request: web.Request) -> web.Response:
    """A page of one stream's history in version order."""
    stream_id = request.match_info["stream_id"]
    q = query(request, StreamQuery)
    async with request.app[POOL].acquire() as conn:
        page = await history.stream_page(conn, stream_id, after_version=q.cursor, limit=q.limit)
    if page is None:
        raise Problem(404, "not_found", f"stream {stream_id!r} has no events")
    return json_body(page.events, stream_id=stream_id, has_more=page.has_more, next_cursor=str(page.next))


@routes.get("/v1/events/export")
@endpoint(scope=SCOPE, reply=replies.RecordedEvent, query=ExportQuery, content_type=NDJSON, headers=(
    Header("Content-Disposition", 'attachment; filename="tally-events-<after>-<to>.ndjson"'),
    Header("X-Export-After", "the range exported is (after, to]", schema={"type": "string", "pattern": "^[0-9]+$"}),
    Header("X-Export-To", "the range's end: `to`, or the head when the request arrived",
           schema={"type": "string", "pattern": "^[0-9]+$"}),
))
async def export(request: web.Request) -> web.StreamResponse:
    """NDJSON of the events in (after, to], `to` defaulting to the head when the request arrives.
    Errors after the first byte can only cut the stream short: check the last line's position."""
    q = query(request, ExportQuery)
    async with request.app[POOL].acquire() as conn:
        to = q.to if q.to is not None else await head(conn)
        response = web.StreamResponse(headers={
            "Content-Type": NDJSON,
            "Content-Disposition": f'attachment; filename="tally-events-{q.after}-{to}.ndjson"',
            "X-Export-After": str(q.after),
            "X-Export-To": str(to),
            REQUEST_ID_HEADER: request[REQUEST_ID],  # sent by the handler: the middleware cannot add it
        })
        await response.prepare(request)
        async for chunk in export_pages(conn, q.after, to):
            await response.write(chunk)
    await response.write_eof()
    return response


@routes.get("/v1/wallets/{wallet_id}/state")
@endpoint(scope=SCOPE, reply=replies.WalletState, query=StateQuery)
async def wallet_state(request: web.Request) -> web.Response:
    """The wallet rebuilt from its own events up to a position or a recorded time (never from a
    snapshot or cache), viewed at that moment: reservations already due then count as expired."""
    wallet_id = path_uuid(request, "wallet_id")
    q = query(request, StateQuery)
    if (q.at_position is None) == (q.as_of is None):
        raise invalid_parameters(("at_position", "give exactly one of at_position and as_of"))
    if q.at_position is not None:
        await check_within_log(request.app, q.at_position, "at_position")
        moment: datetime = await request.app[POOL].fetchval(RECORDED_AT_SQL, q.at_position)
    else:
        assert q.as_of is not None
        if q.as_of > request.app[CLOCK].now():
            raise invalid_parameters(("as_of", "in the future: the answer could still change"))
        moment = q.as_of
    wallet, position = await request.app[REPOSITORY].as_of(Wallet, wallet_id, position=q.at_position, time=q.as_of)
    if wallet is None:
        raise Problem(404, "not_found", f"wallet {wallet_id} did not exist at that point")
    view = wallet.view(moment.astimezone(UTC)).as_dict()
    body = {**view, "position": position, "as_of": moment.astimezone(UTC)}
    return web.Response(body=replies.render(replies.WalletState, body), content_type=JSON)


@routes.get("/v1/audit/verify")
@endpoint(scope=SCOPE, reply=replies.VerifyReport, query=VerifyQuery, errors=("not_found",))
async def verify(request: web.Request) -> web.Response:
    """Verify one stream's hash chain, or the whole log's (slow on a big log: prefer the CLI)."""
    q = query(request, VerifyQuery)
    async with request.app[POOL].acquire() as conn:
        report = await verify_database(conn, q.stream)
    if q.stream is not None and report.events_checked == 0:
        raise Problem(404, "not_found", f"stream {q.stream!r} has no events")
    return web.Response(body=replies.render(replies.VerifyReport, report.as_dict()), content_type=JSON)
