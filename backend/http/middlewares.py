"""Request id and error middlewares: every answer carries X-Request-ID (and, unless it says otherwise,
the ANSWER_HEADERS); every error is problem+json."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import MutableMapping

from aiohttp import web
from aiohttp.typedefs import Handler

from backend.appkeys import SETTINGS
from backend.db import describe, is_unavailable
from backend.http.auth import opens_stream
from backend.http.problems import UNREADABLE, Problem, from_http_exception, problem_response
from backend.http.refusals import PASSING, refusal_response
from backend.logs import request_id_var
from backend.store.events import UnreadableEvent

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a client-chosen id (X-Request-ID, X-Correlation-ID) may be: it reaches logs and event metadata."""
REQUEST_ID = web.RequestKey("request_id", str)
ANSWER_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
"""On every answer that does not set its own: no HTTP cache, a browser's or a proxy's, keeps a copy of
what a key reads or is given (a new key's secret, balances, the log), and no browser takes an answer
for another type than it declares. A conditional read still works: its client keeps its own copy."""


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = offered if VALID_ID.fullmatch(offered) else os.urandom(16).hex()
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers[REQUEST_ID_HEADER] = request_id
        _add_answer_headers(exc.headers)
        raise
    finally:
        request_id_var.reset(token)
    if not response.prepared:
        headers = response.headers
        headers[REQUEST_ID_HEADER] = request_id
        _add_answer_headers(headers)
    return response


def _add_answer_headers(headers: MutableMapping[str, str]) -> None:
    for name, value in ANSWER_HEADERS.items():
        if name not in headers:
            headers[name] = value


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.get(REQUEST_ID)
    try:
        if "%00" in request.raw_path:  # no id, owner or filter can hold NUL: PostgreSQL text cannot
            raise Problem(400, "validation_error", "the path and query string may not contain NUL (%00)")
        return await handler(request)
    except Problem as raised:
        problem = raised
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        problem = from_http_exception(exc)
    except UnreadableEvent as exc:
        log.warning("unreadable event", extra={"position": exc.position, "reason": exc.reason, "path": request.path})
        problem = Problem(502, UNREADABLE, f"{exc}; the log needs repair (audit verify names the event)",
                          extra={"position": exc.position})
    except Exception as exc:
        if is_unavailable(exc):
            log.warning("database unavailable", extra={"reason": describe(exc), "path": request.path})
            problem = Problem(503, "unavailable", "the database is unavailable, try again shortly",
                              headers={"Retry-After": "1"})
        else:
            log.exception("unhandled error", extra={"path": request.path, "method": request.method})
            problem = Problem(500, "internal_error", "an unexpected error occurred")
    if problem.status in PASSING and opens_stream(request):  # a browser's EventSource comes back after it
        response = refusal_response(problem, request.app[SETTINGS], request_id)
    else:
        response = problem_response(problem, request_id)
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
