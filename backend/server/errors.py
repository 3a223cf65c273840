"""Problems for requests aiohttp's HTTP parser rejects, and the raw 408 sent to a slow request head.

The detail is fixed per code: the parser's own message quotes the offending bytes (a header value
carrying a key, say), and an answer or a log line must never echo them."""

from __future__ import annotations

import orjson
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, HttpProcessingError, LineTooLong
from aiohttp.web_exceptions import HTTPException

from backend.http.problems import PROBLEM_CONTENT_TYPE, Problem, problem_body

# aiohttp's C and Python parsers both raise exactly this for more than max_headers fields.
TOO_MANY_HEADERS_MESSAGE = "Too many headers received"


def parser_problem(status: int, exc: BaseException | None, *, max_line_size: int) -> Problem:
    """The problem for what aiohttp's RequestHandler.handle_error was given. The request line and the
    header fields have different limits (max_line_size, max_field_size) so a LineTooLong tells by its
    limit which one was exceeded."""
    if isinstance(exc, LineTooLong):
        if len(exc.args) > 1 and exc.args[1] == max_line_size:
            return Problem(414, "uri_too_long", f"the request line is longer than {max_line_size} bytes")
        return Problem(431, "header_too_large", "a header field is longer than the server accepts")
    if isinstance(exc, BadHttpMessage) and exc.message == TOO_MANY_HEADERS_MESSAGE:
        return Problem(431, "too_many_headers", "the request has more header fields than the server accepts")
    if isinstance(exc, BadHttpMethod):
        return Problem(400, "bad_request", "the request line is not an HTTP/1.1 request line")
    if isinstance(exc, HttpProcessingError):
        code = exc.code if 400 <= exc.code < 500 else 400
        return Problem(code, "bad_request", "the request is not valid HTTP/1.1 (request line, headers or framing)")
    if status == 504:
        return Problem(504, "timeout", "the request took too long to handle")
    return Problem(500, "internal_error", "an unexpected error occurred")


def unmet_expectation(exc: HTTPException) -> Problem:
    """An HTTP error that escaped the app's middlewares: aiohttp raises only its 417 for an Expect other
    than 100-continue there. Its text quotes the header, so the detail is fixed per status."""
    if exc.status == 417:
        return Problem(417, "expectation_failed", "the only Expect this server meets is 100-continue")
    return Problem(exc.status, "http_error", exc.reason)


def head_timeout_response(timeout_s: float) -> bytes:
    """A complete HTTP/1.1 408 answer, written straight to a connection whose request head is late."""
    problem = Problem(408, "request_timeout", f"the request head was not received within {timeout_s:g} s")
    body = orjson.dumps(problem_body(problem))
    head = (f"HTTP/1.1 408 Request Timeout\r\nContent-Type: {PROBLEM_CONTENT_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body
