"""Glue between HTTP handlers and the command bus: context, Idempotency-Key, If-Match, rendering, errors."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from backend.appkeys import CLOCK, COMMANDS
from backend.commands.bus import Command, IdempotencyKey
from backend.commands.context import CommandContext
from backend.commands.errors import CommandError
from backend.commands.outcome import Outcome, Refusal
from backend.domain.errors import DomainError
from backend.http.auth import ACTOR
from backend.http.bodies import read_body
from backend.http.endpoint import ENDPOINT, JSON, reply_model
from backend.http.integers import parse_int
from backend.http.middlewares import REQUEST_ID, VALID_ID
from backend.http.problems import Problem, invalid_parameters, problem_response
from backend.http.replies import render
from backend.store.events import MAX_POSITION

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


def domain_problem(error: DomainError | Refusal) -> Problem:
    extra = {k: v for k, v in error.extra.items() if v is not None}
    return Problem(DOMAIN_STATUS.get(error.code, 422), error.code, error.detail, extra=extra)


def command_problem(error: CommandError) -> Problem:
    return Problem(COMMAND_STATUS.get(error.code, 409), error.code, error.detail)


class Answer:
    """One request's success as its reply model: checked and rendered before the append, with a stand-in
    where the position goes (a body that does not fit fails its command, nothing appended), then given
    the append's position; a replay renders the kept outcome in full, so both are the same bytes."""

    __slots__ = ("_answer", "_parts", "model")

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self._answer: Mapping[str, Any] | None = None
        self._parts: tuple[bytes, bytes] | None = None

    def check(self, answer: Mapping[str, Any]) -> None:
        parts = render(self.model, {**answer, "position": _STAND_IN}).split(_STAND_IN_BYTES)
        self._parts = (parts[0], parts[1]) if len(parts) == 2 else None  # else the text holds its digits
        self._answer = answer

    def render(self, outcome: Outcome) -> bytes:
        if outcome.answer is self._answer and self._parts is not None and outcome.position >= 1:
            head, tail = self._parts
            return b"%b%d%b" % (head, outcome.position, tail)
        return render(self.model, {**outcome.answer, "position": outcome.position})


_STAND_IN = 7_314_159_265_358_979_323
"""A position no store reaches (below 2**63), cut out of an answer rendered before its append."""
_STAND_IN_BYTES = b"%d" % _STAND_IN


def success_status(request: web.Request) -> int:
    """201 where the endpoint creates, else 200, for the first answer and every replay (a 204 endpoint
    answers with its 200 write reply, as it always has, and strips the body itself)."""
    return 201 if request[ENDPOINT].status == 201 else 200


def if_match(request: web.Request) -> int | None:
    """The version named by If-Match (a bare number or an ETag such as "3" or W/"3"). `*` asks only
    that the target exist (RFC 9110), which every command on a path's resource checks anyway."""
    raw = request.headers.get("If-Match")
    if raw is None or raw.strip(" \t") == "*":
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
    """Run the command message through the bus and answer with its (possibly replayed) outcome."""
    request_id = request.get(REQUEST_ID)
    app = request.app
    ctx = CommandContext(request[ACTOR], request_id, correlation_id(request) or request_id, app[CLOCK].now())
    idem = idempotency_key(request, await read_body(request))
    try:
        answer = Answer(reply_model(request))
        outcome = await app[COMMANDS].run(ctx, command, idem, answer.check)
    except DomainError as error:
        raise domain_problem(error) from None
    except CommandError as error:
        raise command_problem(error) from None
    return outcome_response(request, outcome, answer)


def locate_created(request: web.Request, response: web.Response) -> web.Response:
    """Location of what a 201 created (the endpoint's `creates`), named by the answer's body: a replay's
    body names what the first request created, not the id this request drew and never used."""
    creates = request[ENDPOINT].creates
    if creates is not None and response.status == 201 and isinstance(response.body, bytes):
        response.headers["Location"] = creates.format_map(orjson.loads(response.body))
    return response


def outcome_response(request: web.Request, outcome: Outcome, answer: Answer) -> web.Response:
    """The status, body and headers of an outcome: HTTP's choices, the same for a replay as for the first."""
    if outcome.refusal is not None:
        response = problem_response(domain_problem(outcome.refusal), outcome.refusal.request_id)
    else:
        response = web.Response(status=success_status(request), body=answer.render(outcome), content_type=JSON)
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if outcome.position:
        response.headers["X-Position"] = str(outcome.position)
    return response
