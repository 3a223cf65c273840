"""RFC 9457 problem details: one exception type for every error answer, one renderer."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_BASE = "https://tally.dev/problems/"
UNKNOWN_TYPE = "unknown_event_type"
UNREADABLE = "unreadable_event"
"""502: the log holds a value the service cannot read (backend.store.events.UnreadableEvent). Not the
client's fault (4xx), not an outage that passes (503), not a bug of the service (500): the database
answered with what no append writes. Nothing changes until the log is repaired; `audit verify` names it."""


class Problem(Exception):
    """Raise anywhere in a handler; the error middleware renders it as problem+json."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(detail)
        self.close = close
        """Answer with Connection: close: what is left of the request on the connection cannot be read."""
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def invalid_parameters(*errors: tuple[str, str]) -> Problem:
    """400 validation_error for query parameters or headers, each (field, message) listed in `errors`
    as a body's 422 lists its fields, the first also as `field`. A request line or header that is
    wrong is 400; a body that parses but does not fit its model is 422."""
    detail = "; ".join(f"{field}: {message}" for field, message in errors)
    listed = [{"field": field, "message": message} for field, message in errors]
    return Problem(400, "validation_error", detail, extra={"field": errors[0][0], "errors": listed})


def unknown_event_types(field: str, names: Collection[str]) -> Problem:
    """400 unknown_event_type: a filter naming a type the log never holds would match nothing, so a typo
    would look like a quiet log. The names are listed in `unknown`; the field as in a validation_error."""
    unknown = sorted(names)
    message = "unknown event type" + ("s " if len(unknown) > 1 else " ") + ", ".join(repr(n) for n in unknown)
    return Problem(400, UNKNOWN_TYPE, f"{field}: {message}", extra={
        "field": field, "errors": [{"field": field, "message": message}], "unknown": unknown})


def problem_body(problem: Problem, request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": TYPE_BASE + problem.code.replace("_", "-"),
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
    }
    if request_id:
        body["request_id"] = request_id
    body.update(problem.extra)
    return body


def problem_response(problem: Problem, request_id: str | None = None) -> web.Response:
    response = web.Response(
        status=problem.status,
        body=orjson.dumps(problem_body(problem, request_id)),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=problem.headers,
    )
    if problem.close:
        response.force_close()
    return response


# aiohttp's own HTTP errors (routing, body size) mapped to stable codes.
HTTP_ERROR_CODES = {
    400: "validation_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


def from_http_exception(exc: web.HTTPException) -> Problem:
    code = HTTP_ERROR_CODES.get(exc.status, "http_error")
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    headers = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "retry-after"}}
    return Problem(exc.status, code, detail, title=exc.reason, headers=headers)
