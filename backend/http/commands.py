"""Glue between HTTP handlers and the command bus: context, Idempotency-Key, If-Match, rendering, errors."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from backend.appkeys import CLOCK, COMMANDS
from backend.commands.bus import Command, Decision, IdempotencyKey, Reply, Respond
from backend.commands.context import CommandContext
from backend.commands.errors import CommandError
from backend.domain.errors import DomainError
from backend.http.auth import ACTOR
from backend.http.endpoint import ENDPOINT, JSON, reply_model
from backend.http.integers import parse_int
from backend.http.middlewares import REQUEST_ID, VALID_ID
from backend.http.problems import PROBLEM_CONTENT_TYPE, Problem, invalid_parameters, problem_body
from backend.http.replies import render
from backend.store.events import MAX_POSITION, AppendResult

_ETAG = re.compile(r'(?:W/)?"([^"]*)"|([^"]*)')
"""An entity tag, strong or weak, or a bare version: the version is whichever group matched."""

CORRELATION_ID = "X-Correlation-ID"
MAX_IDEMPOTENCY_KEY = 255


def valid_idempotency_key(key: str) -> bool:
    """1 to 255 characters of visible ASCII (! to ~): the key is stored and compared byte for byte, so
    nothing a client could send two ways. (String methods: a regular expression cost more per command.)"""
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY and key.isascii() and key.isprintable() and " " not in key


DOMAIN_STATUS = {
    "insufficient_funds": 422,
    "amount_exceeds_reserved": 422,
    "currency_mismatch": 422,
    "same_wallet": 422,
    "validation_error": 422,
    "lock_not_open": 409,
    "reservation_not_open": 409,
    "reservation_expired": 409,
    "invalid_transition": 409,
}

COMMAND_STATUS = {
    "not_found": 404,
    "forbidden": 403,
    "precondition_failed": 412,
    "wrong_expected_version": 409,
    "idempotency_in_flight": 409,
    "idempotency_conflict": 422,
    "signing_not_configured": 404,  # backend.http.audit_tree: no AUDIT_SIGNING_KEY_FILE
}


def domain_problem(error: DomainError) -> Problem:
    extra = {k: v for k, v in error.extra.items() if v is not None}
    return Problem(DOMAIN_STATUS.get(error.code, 422), error.code, error.detail, extra=extra)


def command_problem(error: CommandError) -> Problem:
    return Problem(COMMAND_STATUS.get(error.code, 409), error.code, error.detail)


class JsonRenderer:
    """Success: the decision's body plus the append's position, as the reply model. Failure: problem+json.

    A body that does not fit the model fails its own request before anything of it is appended when
    an Idempotency-Key stores the answer (the planner isolates a broken renderer), else after."""

    def __init__(self, request_id: str | None, reply: type[BaseModel], status: int = 200) -> None:
        self.request_id = request_id
        self.reply = reply
        self.status = status
        """The endpoint's success status (201 where it creates): HTTP's choice, not the command's."""

    def success(self, decision: Decision, result: AppendResult) -> tuple[int, bytes, str]:
        return self.status, render(self.reply, {**decision.body, "position": result.position}), JSON

    def prepare(self, decision: Decision) -> Respond:
        """The body rendered now with a stand-in position, cut where the real one goes. A client's text
        may hold one stand-in's digits (then the other serves); holding both, it renders again later."""
        status = self.status
        for stand_in in _STAND_INS:
            parts = render(self.reply, {**decision.body, "position": stand_in}).split(b"%d" % stand_in)
            if len(parts) == 2:
                head, tail = parts
                return lambda position: (status, b"%b%d%b" % (head, position, tail), JSON)
        return lambda position: (status, render(self.reply, {**decision.body, "position": position}), JSON)

    def failure(self, error: DomainError) -> tuple[int, bytes, str]:
        problem = domain_problem(error)
        return problem.status, orjson.dumps(problem_body(problem, self.request_id)), PROBLEM_CONTENT_TYPE


def success_status(request: web.Request) -> int:
    """201 where the endpoint creates, else 200: the status stored with an Idempotency-Key's answer (a
    204 endpoint stores its 200 write reply, as it always has, and strips the body itself)."""
    return 201 if request[ENDPOINT].status == 201 else 200


_STAND_INS = (7_314_159_265_358_979_323, 8_271_828_182_845_904_523)
"""Positions no store reaches (below 2**63), cut out of a body rendered before its append."""


def if_match(request: web.Request) -> int | None:
    """The version named by If-Match (a bare number or an ETag such as "3" or W/"3")."""
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    match = _ETAG.fullmatch(raw)
    return parse_int(match[1] or match[2] or "" if match else "", "If-Match", maximum=MAX_POSITION,
                     message='must be a stream version such as "3" (ASCII digits)')


def correlation_id(request: web.Request) -> str | None:
    """X-Correlation-ID, recorded in the metadata of every event the command appends."""
    value = request.headers.get(CORRELATION_ID)
    if value is not None and not VALID_ID.fullmatch(value):
        raise invalid_parameters((CORRELATION_ID, "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"))
    return value


def idempotency_key(request: web.Request, body: bytes) -> IdempotencyKey | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not valid_idempotency_key(key):
        raise invalid_parameters(("Idempotency-Key", "must be 1 to 255 visible ASCII characters (no space)"))
    try:
        canonical: Any = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS) if body.strip() else b""
    except orjson.JSONDecodeError:
        canonical = body
    fingerprint = hashlib.sha256(b"\n".join([request.method.encode(), request.path.encode(), canonical])).digest()
    return IdempotencyKey(request[ACTOR].key_id, key, fingerprint)


async def run_command(request: web.Request, command: Command) -> web.Response:
    """Run the command message through the bus and answer with its (possibly replayed) bytes."""
    request_id = request.get(REQUEST_ID)
    app = request.app
    ctx = CommandContext(request[ACTOR], request_id, correlation_id(request) or request_id, app[CLOCK].now())
    idem = idempotency_key(request, await request.read())
    try:
        renderer = JsonRenderer(request_id, reply_model(request), success_status(request))
        reply = await app[COMMANDS].run(ctx, command, renderer, idem)
    except DomainError as error:
        raise domain_problem(error) from None
    except CommandError as error:
        raise command_problem(error) from None
    return reply_response(reply)


def locate_created(request: web.Request, response: web.Response) -> web.Response:
    """Location of what a 201 created (the endpoint's `creates`), named by the answer's body: a replay's
    body names what the first request created, not the id this request drew and never used."""
    creates = request[ENDPOINT].creates
    if creates is not None and response.status == 201 and isinstance(response.body, bytes):
        response.headers["Location"] = creates.format_map(orjson.loads(response.body))
    return response


def reply_response(reply: Reply) -> web.Response:
    response = web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)
    if reply.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if reply.position:
        response.headers["X-Position"] = str(reply.position)
    return response
