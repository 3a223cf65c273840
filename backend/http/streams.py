"""The SSE endpoints (aiohttp-sse): every check happens before the response starts, so an
authorization or input failure is an ordinary problem+json answer (a browser's EventSource then stops
retrying); after that the stream only ends by the client leaving, a stuck send, or shutdown.

A stream refused for a passing reason (no room for it, a shutdown, the database, the key's request
rate) is different: the client should come back, so it is answered as backend/http/refusals.py says
(the error middleware turns every 429 and 503 on a stream into such an answer).

Resume position: ``?after=N`` (or ``after=now``, the head) positions a fresh connection; a browser
reconnecting re-sends the same URL together with ``Last-Event-ID``, which is then further along and
takes over (the later of the two counts; ``now`` never skips past a Last-Event-ID). Without either,
a stream starts at the beginning of the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from aiohttp import web

from backend.appkeys import (
    AUTHENTICATOR,
    CLOCK,
    HUB,
    LISTENER,
    LOG_TAIL,
    POOL,
    READ_POOLS,
    REPOSITORY,
    SETTINGS,
    SHARED_LIMITS,
    SUPERVISOR,
)
from backend.commands.context import Actor
from backend.domain import Wallet, wallet_stream
from backend.http.auth import ACTOR, invalid_key
from backend.http.authenticator import ApiKeyAuthenticator
from backend.http.endpoint import SSE, Param, endpoint
from backend.http.integers import parse_int
from backend.http.middlewares import REQUEST_ID, REQUEST_ID_HEADER
from backend.http.path_ids import path_uuid
from backend.http.positions import check_within_log
from backend.http.problems import UNKNOWN_TYPE, Problem, invalid_parameters, unknown_event_types
from backend.http.refusals import refusal_response
from backend.store import reads
from backend.store.events import MAX_POSITION, MAX_STREAM_ID_LENGTH
from backend.streaming import frames, tcp
from backend.streaming.dashboard import projection_stats
from backend.streaming.filters import EventFilter, InvalidFilter, UnknownTypes, parse_filter
from backend.streaming.hub import Hub, HubConfig, StreamRefused
from backend.streaming.sse import EventStream, WalletFollower
from backend.streaming.subscriber import Render, Subscriber

routes = web.RouteTableDef()

LAST_EVENT_ID = "Last-Event-ID"


# ---------------------------------------------------------------- lifecycle (wired in backend.app)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    """This process's hub, reading through the app's read pools (catch-up pages from a replica that has
    them) and woken by its one Listener; a key's revocation ends its streams."""
    pool = app[POOL]
    hub = Hub(app[READ_POOLS], app[LISTENER], HubConfig.from_settings(app[SETTINGS]),
              projection_stats(pool, app[CLOCK]), app[SUPERVISOR], tail=app[LOG_TAIL],
              host_streams=app.get(SHARED_LIMITS))
    await hub.start()
    app[HUB] = hub
    authenticator = app[AUTHENTICATOR]
    authenticator.on_revoked = hub.end_streams_of
    try:
        yield
    finally:
        authenticator.on_revoked = None
        await hub.close()


async def close_streams(app: web.Application) -> None:
    """on_shutdown: end the streams first. aiohttp then waits for in-flight handlers (up to its
    shutdown timeout) before the cleanup contexts run, so a stream still open would hold shutdown
    for that whole timeout and then be cancelled rather than ended."""
    hub = app.get(HUB)
    if hub is not None:
        await hub.shutdown()


# ---------------------------------------------------------------- checks before the stream starts


def viewer_owner(actor: Actor) -> str | None:
    """None when the key sees every stream (``audit:read``); else the owner whose wallets it sees."""
    if actor.allows("audit:read"):
        return None
    if actor.allows("wallets:read"):
        return actor.owner
    raise Problem(403, "forbidden", "streams need an API key with the 'wallets:read' or 'audit:read' scope")


def _position(raw: str, field: str) -> int:
    return parse_int(raw, field, maximum=MAX_POSITION,
                     message="must be a log position (a non-negative integer of ASCII digits)"
                     + (" or 'now'" if field == "after" else ""))


async def start_position(request: web.Request) -> int:
    """Where a log stream resumes: every matching event after this position is sent."""
    header = request.headers.get(LAST_EVENT_ID)
    last = _position(header, LAST_EVENT_ID) if header is not None else None
    if last is not None:
        await check_within_log(request.app, last, LAST_EVENT_ID)
    after = request.query.get("after")
    if after is None:
        return last if last is not None else 0
    if after == "now":
        return last if last is not None else await reads.head(request.app[POOL])
    given = _position(after, "after")
    await check_within_log(request.app, given, "after")
    return max(given, last or 0)


def _filter(request: web.Request, owner: str | None) -> EventFilter:
    try:
        flt = parse_filter(request.query)
    except UnknownTypes as exc:
        raise unknown_event_types(exc.field, exc.names) from None
    except InvalidFilter as exc:
        raise invalid_parameters((exc.field, str(exc))) from None
    return dataclasses.replace(flt, owner=owner) if owner is not None else flt


def _refused(exc: StreamRefused, request: web.Request) -> Problem:
    if exc.reason == "key":
        cap = request.app[SETTINGS].sse_max_streams_per_key
        return Problem(429, "rate_limited", f"this API key already has {cap} open streams; close one first")
    if exc.reason == "process":
        return Problem(503, "unavailable", "this server holds as many streams as it may; try again shortly")
    return Problem(503, "unavailable", "this server is shutting down; reconnect")


def event_names(request: web.Request) -> bool:
    """``?event_names=true`` names each event frame by its type; by default frames are unnamed."""
    raw = request.query.get("event_names", "false")
    if raw not in ("true", "false"):
        raise invalid_parameters(("event_names", "must be 'true' or 'false'"))
    return raw == "true"


# ---------------------------------------------------------------- endpoints


ACCESS = "a key with wallets:read follows its owner's wallets; one with audit:read follows every stream"
STREAM_ID = {"type": "string", "minLength": 1, "maxLength": MAX_STREAM_ID_LENGTH}
RESUME = (
    Param(LAST_EVENT_ID, "resume after this position (the id of the last event received)",
          {"type": "integer", "minimum": 0, "maximum": MAX_POSITION}, "header"),
    Param("after", "resume after this position, or 'now' for new events only (the later of this and Last-Event-ID)",
          {"type": "string", "pattern": "^([0-9]{1,19}|now)$"}),
    Param("access_token", "a stream token from POST /v1/stream-tokens, for clients such as EventSource that "
          "cannot send Authorization (an API key is also taken here, but discouraged: URLs get logged and kept)"),
    Param("event_names", "true: name each frame by its event type (`event: WalletCredited`) for per-type "
          "listeners; by default frames are unnamed, so `onmessage` receives every event (the type is in the data)",
          {"type": "string", "enum": ["true", "false"]}),
)


@routes.get("/v1/streams/events", allow_head=False)  # HEAD would send the stream: no body-less form
@endpoint(access=ACCESS, content_type=SSE, frames="StreamEvent", errors=(UNKNOWN_TYPE,), params=(
    *RESUME,
    Param("stream", "only this stream's events", STREAM_ID),
    Param("stream_prefix", "only the events of streams starting with this (a category, such as 'wallet-')", STREAM_ID),
    Param("types", "only these event types, comma separated (a name the log never holds is 400 unknown_event_type)"),
))
async def stream_events(request: web.Request) -> web.StreamResponse:
    """The event log, filtered by ``stream``, ``stream_prefix`` and ``types``."""
    owner = viewer_owner(request[ACTOR])
    flt = _filter(request, owner)
    named = event_names(request)
    if owner is not None and flt.stream is not None:
        stream_owner = await request.app[HUB].owners.owner_of(flt.stream)
        if stream_owner != owner:
            raise Problem(403, "forbidden", "this API key may only follow its owner's wallets")
    position = await start_position(request)
    return await serve(request, position, flt, frames.named_frames if named else None)


@routes.get("/v1/streams/wallets/{wallet_id}", allow_head=False)
@endpoint(access=ACCESS, content_type=SSE, frames="WalletStreamEvent", params=RESUME)
async def stream_wallet(request: web.Request) -> web.StreamResponse:
    """One wallet's events, each with the wallet's figures right after it."""
    owner = viewer_owner(request[ACTOR])
    wallet_id = path_uuid(request, "wallet_id")
    named = event_names(request)
    # Whether it exists and whose it is, from the hub's map of owners rather than the repository: a
    # wallet loaded there would stay in its cache, crowding out the wallets commands are working on
    # (ten thousand followers would fill it), and the state at the resume position is read anyway.
    wallet_owner = await request.app[HUB].owners.owner_of(wallet_stream(wallet_id))
    if wallet_owner is None:
        raise Problem(404, "not_found", f"wallet {wallet_id} does not exist")
    if owner is not None and wallet_owner != owner:
        raise Problem(403, "forbidden", f"wallet {wallet_id} belongs to another owner")
    position = await start_position(request)
    state, _ = await request.app[REPOSITORY].as_of(Wallet, wallet_id, position=position)
    follower = WalletFollower(wallet_id, state, named)
    return await serve(request, position, EventFilter(stream=wallet_stream(wallet_id)), follower.render)


@routes.get("/v1/streams/dashboard", allow_head=False)
@endpoint(access=ACCESS, content_type=SSE, params=RESUME[2:3])
async def stream_dashboard(request: web.Request) -> web.StreamResponse:
    """A ``snapshot`` of the stats read model, then ``stats`` deltas at a bounded rate (frames named
    ``snapshot`` and ``stats``)."""
    viewer_owner(request[ACTOR])
    return await serve(request, None, None, None)


async def serve(request: web.Request, position: int | None, flt: EventFilter | None, render: Render | None
                ) -> web.StreamResponse:
    """Admit the stream (429/503 before anything is sent) and start the response; it streams once
    returned (see EventStream). flt None is a dashboard stream, which starts with a snapshot, so has
    no resume position; render replaces the shared event frames (wallet streams add figures)."""
    hub = request.app[HUB]
    settings = request.app[SETTINGS]
    transport = request.transport
    if transport is None or transport.is_closing():
        raise Problem(503, "unavailable", "the connection closed before the stream started")
    try:
        subscriber = hub.subscribe(request[ACTOR].key_id, transport, position or 0, flt, render)
    except StreamRefused as exc:
        return refusal_response(_refused(exc, request), settings, request[REQUEST_ID])
    if request.app[AUTHENTICATOR].revoked(subscriber.key_id):  # while the checks above awaited: too late for
        hub.unsubscribe(subscriber)                               # the hub to end it, so it never starts
        raise invalid_key()
    end_at_expiry(subscriber, request.app[AUTHENTICATOR])
    tcp.limit_send_buffer(transport, settings.sse_socket_send_buffer)
    try:
        if flt is None:
            await _stats_ready(hub)
        response = EventStream(hub, subscriber, settings.sse_retry_ms, sep="\n",
                               send_timeout=settings.sse_send_timeout_s, ping_interval=settings.sse_heartbeat_s)
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
        subscriber.sink = response
        await response.prepare(request)
    except BaseException:
        hub.unsubscribe(subscriber)
        raise
    return response


def end_at_expiry(subscriber: Subscriber, authenticator: ApiKeyAuthenticator) -> None:
    """A key's open streams end when it expires, as they do when it is revoked (cleanly: a browser
    reconnects and is refused, 401). One timer per stream; the hub cancels it if the stream ends first."""
    expires_at = authenticator.expires_at(subscriber.key_id)
    if expires_at is not None:
        delay = (expires_at - authenticator.wall_clock.now()).total_seconds()
        subscriber.expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), subscriber.close)


async def _stats_ready(hub: Hub) -> None:
    try:
        async with asyncio.timeout(5.0):
            await hub.stats.ready.wait()
    except TimeoutError:
        raise Problem(503, "unavailable", "the stats read model cannot be read right now",
                      headers={"Retry-After": "1"}) from None
