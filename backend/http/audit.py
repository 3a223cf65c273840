"""Audit endpoints, all behind the `audit:read` scope: history pages, the NDJSON
export, a wallet's state at a past position or time, and hash-chain verification."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from aiohttp import web
from pydantic import Field, StringConstraints, field_validator

from backend.appkeys import CLOCK, LOG_VERIFICATION, READ_POOLS, REPOSITORY, STATE_REPLAY
from backend.audit import history
from backend.audit.export import ExportPage, export_page
from backend.audit.verify import Report, verify_database
from backend.db import Connection, describe, is_unavailable
from backend.domain import Wallet
from backend.domain.registry import LOGGED_TYPES
from backend.http import replies
from backend.http.audit_params import SCOPE, Limit, Position, Query, StreamId, query
from backend.http.endpoint import JSON, NDJSON, Header, endpoint
from backend.http.integers import ASCII_DIGITS_ONLY
from backend.http.middlewares import ANSWER_HEADERS, REQUEST_ID, REQUEST_ID_HEADER
from backend.http.models import Rfc3339
from backend.http.path_ids import path_uuid
from backend.http.positions import check_within_log
from backend.http.problems import UNKNOWN_TYPE, UNREADABLE, Problem, invalid_parameters, unknown_event_types
from backend.store import reads
from backend.store.events import MAX_POSITION, MAX_TYPE_LENGTH
from backend.store.read_pools import connection
from backend.store.reads import Executor

routes = web.RouteTableDef()

MAX_VERSION = 2**31 - 1


log = logging.getLogger(__name__)


class ClientLeft(Exception):
    """Writing to the client failed: not the database's failure, so neither a reason to change servers
    nor a 503 (the client is gone; the request counts as the 200 it was)."""


class LogQuery(Query):
    cursor: Annotated[Position, Field(description="next_cursor of the previous page: a position, the page "
                                                  "starts after it (default 0: the start of the log)")] = 0
    limit: Limit = 100
    types: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_TYPE_LENGTH)]] | None,
                     Field(description="only these event types, comma separated (a name the log never holds is "
                                       "400 unknown_event_type)")] = None
    stream_prefix: StreamId | None = None
    from_time: Rfc3339 | None = None
    to_time: Rfc3339 | None = None

    @field_validator("types", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",")] if isinstance(value, str) else value


class StreamQuery(Query):
    cursor: Annotated[int, Field(ge=0, le=MAX_VERSION, description="next_cursor of the previous page: a "
                                 "version, the page starts after it (default 0: the first event)"),
                      ASCII_DIGITS_ONLY] = 0
    limit: Limit = 100


class ExportQuery(Query):
    after: Position = 0
    to: Position | None = None


class StateQuery(Query):
    at_position: Annotated[int, Field(ge=1, le=MAX_POSITION), ASCII_DIGITS_ONLY] | None = None
    as_of: Rfc3339 | None = None


class VerifyQuery(Query):
    stream: StreamId | None = None


def json_body(events: list[bytes], **fields: Any) -> web.Response:
    """A page of events already encoded by event_json, as `data`: spliced in, not decoded and validated
    again (a test holds these pages to replies.EventPage and replies.StreamPage)."""
    body = orjson.dumps({"data": [orjson.Fragment(e) for e in events], **fields})
    return web.Response(body=body, content_type=JSON)


@routes.get("/v1/events")
@endpoint(scope=SCOPE, reply=replies.EventPage, query=LogQuery, errors=(UNKNOWN_TYPE,))
async def log_events(request: web.Request) -> web.Response:
    """A page of the global log in position order, optionally filtered."""
    q = query(request, LogQuery)
    if q.types and (unknown := set(q.types) - LOGGED_TYPES):
        raise unknown_event_types("types", unknown)
    await check_within_log(request.app, q.cursor, "cursor")  # a page after it would skip what comes up to it

    async def read(db: Executor) -> history.Page:
        async with connection(db) as conn:
            return await history.log_page(conn, after=q.cursor, limit=q.limit, types=q.types,
                                          stream_prefix=q.stream_prefix, from_time=q.from_time, to_time=q.to_time)

    page = await request.app[READ_POOLS].read(read, at_least=q.cursor)
    return json_body(page.events, has_more=page.has_more, next_cursor=str(page.next), head=page.head)


@routes.get("/v1/streams/{stream_id}/events")
@endpoint(scope=SCOPE, reply=replies.StreamPage, query=StreamQuery)
async def stream_events(request: web.Request) -> web.Response:
    """A page of one stream's history in version order."""
    stream_id = request.match_info["stream_id"]
    q = query(request, StreamQuery)

    async def read(db: Executor) -> history.Page | history.BeyondStream | None:
        async with connection(db) as conn:
            return await history.stream_page(conn, stream_id, after_version=q.cursor, limit=q.limit)

    pools = request.app[READ_POOLS]
    page = await pools.read(read)
    if not isinstance(page, history.Page) and pools.replicas:
        page = await read(pools.primary)
    if page is None:
        raise Problem(404, "not_found", f"stream {stream_id!r} has no events")
    if isinstance(page, history.BeyondStream):
        raise invalid_parameters(("cursor", f"is beyond the stream's last version ({page.last}): "
                                            "not a cursor this API answered"))
    return json_body(page.events, stream_id=stream_id, has_more=page.has_more, next_cursor=str(page.next))


@routes.get("/v1/events/export", allow_head=False)  # streamed: HEAD would send the body
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
    pools = request.app[READ_POOLS]
    if q.to is not None:  # a range past the head would export differently later: the same bytes or a 400
        await check_within_log(request.app, q.to, "to")
    else:
        await check_within_log(request.app, q.after, "after")
    to = q.to if q.to is not None else await reads.head(pools.primary)
    if q.after > to:  # not an empty range: headers naming (after, to] would claim one
        raise invalid_parameters(("after", f"is beyond to ({to}): nothing to export"))
    response = web.StreamResponse(headers={
        "Content-Type": NDJSON,
        "Content-Disposition": f'attachment; filename="tally-events-{q.after}-{to}.ndjson"',
        "X-Export-After": str(q.after),
        "X-Export-To": str(to),
        REQUEST_ID_HEADER: request[REQUEST_ID],  # sent by the handler: the middleware cannot add these
        **ANSWER_HEADERS,
    })
    sent = q.after

    async def next_page(db: Executor) -> ExportPage | None:
        """The page after the last line sent. Its connection goes back to the pool before the page is
        written: a client that reads slowly, or not at all, holds none (else a few such downloads would
        take every connection from the commands). From a replica only if it holds `to`; one that fails
        hands the page over to the primary."""
        async with connection(db) as conn:
            return await export_page(conn, sent, to)

    try:
        while sent < to and (page := await pools.read(next_page, at_least=to)) is not None:
            if not response.prepared:
                await response.prepare(request)
            try:
                await response.write(page.ndjson)
            except OSError as exc:
                raise ClientLeft from exc
            sent = page.last
        if not response.prepared:
            await response.prepare(request)
    except ClientLeft:
        return response  # nobody to answer: no error to report, the database is fine (aiohttp ends it)
    except Exception as exc:
        if not response.prepared:
            raise  # nothing sent yet: the error middleware answers with a problem document
        cut_short(request, exc, sent)
    else:
        await response.write_eof()
    return response


def cut_short(request: web.Request, exc: Exception, sent: int) -> None:
    """An export under way cannot become an error answer (a problem document would land in the middle
    of the NDJSON): close the connection without the body's last chunk, so that the client sees an
    incomplete transfer, never a complete-looking export. Its last line says how far it got."""
    if is_unavailable(exc):
        log.warning("export cut short: the database is unavailable", extra={"reason": describe(exc), "sent": sent})
    else:
        log.error("export cut short by an unexpected error", exc_info=exc, extra={"sent": sent})
    if request.transport is not None:
        request.transport.close()


@routes.get("/v1/wallets/{wallet_id}/state")
@endpoint(scope=SCOPE, reply=replies.WalletState, query=StateQuery, errors=(UNREADABLE,))
async def wallet_state(request: web.Request) -> web.Response:
    """The wallet rebuilt from its own events up to a position or a recorded time (never from a
    snapshot or cache), viewed at that moment: reservations already due then count as expired. The
    replay reads the whole stream on one connection, so replays take turns (STATE_REPLAY)."""
    wallet_id = path_uuid(request, "wallet_id")
    q = query(request, StateQuery)
    if (q.at_position is None) == (q.as_of is None):
        raise invalid_parameters(("at_position", "give exactly one of at_position and as_of"))
    if q.at_position is not None:
        await check_within_log(request.app, q.at_position, "at_position")
    elif q.as_of is not None and q.as_of > request.app[CLOCK].now():
        raise invalid_parameters(("as_of", "in the future: the answer could still change"))
    repository = request.app[REPOSITORY]

    async def recorded_since(conn: Connection) -> bool:
        """The log holds an event recorded after as_of. recorded_at never goes backwards along the log and
        positions commit in order, so every event recorded up to as_of is then committed and in sight."""
        newest = await history.newest_recorded(conn)
        return newest is not None and q.as_of is not None and newest > q.as_of

    async def read(db: Executor) -> tuple[Wallet | None, int, datetime, bool]:
        async with connection(db) as conn:
            if q.at_position is not None:
                moment, final = await history.recorded_at(conn, q.at_position), True
            else:
                assert q.as_of is not None
                moment, final = q.as_of, await recorded_since(conn)  # before the wallet's events are read
            assert isinstance(moment, datetime)
            wallet, position = await repository.as_of(Wallet, wallet_id, position=q.at_position, time=q.as_of,
                                                      db=conn)
        return wallet, position, moment, final

    pools, turns = request.app[READ_POOLS], request.app[STATE_REPLAY]
    if q.at_position is not None:
        wallet, position, moment, final = await turns.read(pools, read, at_least=q.at_position)
    else:
        wallet, position, moment, final = await turns.read(pools, read, ready=recorded_since)
    if wallet is None:
        raise Problem(404, "not_found", f"wallet {wallet_id} did not exist at that point")
    view = wallet.view(moment.astimezone(UTC)).as_dict()
    body = {**view, "position": position, "as_of": moment.astimezone(UTC), "final": final}
    return web.Response(body=replies.render(replies.WalletState, body), content_type=JSON)


@routes.get("/v1/audit/verify")
@endpoint(scope=SCOPE, reply=replies.VerifyReport, query=VerifyQuery, errors=("not_found",))
async def verify(request: web.Request) -> web.Response:
    """Verify one stream's hash chain, or the whole log's (slow on a big log: prefer the CLI; one
    whole-log verification runs at a time, the others wait for their turn holding no connection)."""
    q = query(request, VerifyQuery)

    async def read(db: Executor) -> Report:
        async with connection(db) as conn:
            return await verify_database(conn, q.stream)

    pools = request.app[READ_POOLS]
    if q.stream is None:
        report = await request.app[LOG_VERIFICATION].read(pools, read)
    else:
        report = await pools.read(read)
    if q.stream is not None and report.events_checked == 0 and pools.replicas:
        report = await read(pools.primary)
    if q.stream is not None and report.events_checked == 0:
        raise Problem(404, "not_found", f"stream {q.stream!r} has no events")
    return web.Response(body=replies.render(replies.VerifyReport, report.as_dict()), content_type=JSON)
