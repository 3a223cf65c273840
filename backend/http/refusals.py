"""Refusals a browser's EventSource retries. It gives up for good on any answer but a 200
text/event-stream one, and reconnects after one that ends: so a stream refused for a passing reason
(no room for it, a shutdown, the key's request rate, the database) is such an answer, advising
``retry:`` and holding one ``event: refused`` frame with the problem+json document (and its
``retry_after``), with the headers ``X-Stream-Refused: <code>`` and ``Retry-After`` for other clients.
400, 401, 403 and 404 stay ordinary problem+json answers: retrying would not change them.
"""

from __future__ import annotations

import math

from aiohttp import web

from backend.config import Settings
from backend.http.auth import SSE
from backend.http.problems import Problem, problem_body
from backend.streaming import frames

REFUSED_HEADER = "X-Stream-Refused"
PASSING = frozenset({429, 503})
"""The statuses of refusals that pass by themselves."""


def refusal_response(problem: Problem, settings: Settings, request_id: str | None) -> web.Response:
    """200 text/event-stream that advises ``retry:`` (SSE_RETRY_MS, or the problem's own Retry-After if
    that is longer: a browser coming back sooner would be refused again) and ends."""
    given = problem.headers.get("Retry-After", "")
    retry_ms = max(settings.sse_retry_ms, int(given) * 1000 if given.isdigit() else 0)
    retry_s = max(1, math.ceil(retry_ms / 1000))
    advised = Problem(problem.status, problem.code, problem.detail, title=problem.title,
                      extra={**problem.extra, "retry_after": retry_s})
    body = frames.refusal(retry_ms, frames.dumps(problem_body(advised, request_id)))
    headers = {**problem.headers, "Retry-After": str(retry_s), REFUSED_HEADER: problem.code,
               "Cache-Control": "no-cache"}
    return web.Response(status=200, body=body, content_type=SSE, headers=headers)
