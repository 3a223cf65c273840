"""Request bodies: JSON parsed with orjson and validated by a pydantic model, or a clear 4xx."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from backend.appkeys import SETTINGS
from backend.http.problems import Problem

Model = TypeVar("Model", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024


async def read_body(request: web.Request) -> bytes:
    """The request body's bytes (aiohttp keeps them: a second read costs nothing). A body that cannot
    be decoded (a bad Content-Encoding) or that ends early (the client closed the connection) is the
    client's 400, not a 500 or, from the ConnectionResetError, the database's 503. One that takes
    longer than BODY_READ_TIMEOUT_S is a 408: a client sending it a byte at a time, or stopping
    halfway, would otherwise hold the connection and its handler for as long as it liked."""
    timeout = request.app[SETTINGS].body_read_timeout_s
    try:
        if request.content.is_eof():  # the whole body came with the head, as a command's usually does
            return await request.read()
        async with asyncio.timeout(timeout or None):
            return await request.read()
    except TimeoutError:
        request.content.feed_eof()
        raise Problem(408, "request_timeout", f"the request body was not received within {timeout:g} s",
                      close=True) from None
    except (web.RequestPayloadError, ConnectionResetError) as exc:
        request.content.feed_eof()  # aiohttp would read on after the answer, and log the same error again
        detail = ("the connection closed before the whole request body arrived" if isinstance(exc, ConnectionError)
                  else "the body could not be decoded as its Content-Encoding says")
        raise Problem(400, "bad_request", detail, close=True) from None


async def read_json(request: web.Request, model: type[Model]) -> Model:
    raw = await read_body(request)
    if len(raw) > MAX_BODY_BYTES:
        raise Problem(413, "payload_too_large", f"request body exceeds {MAX_BODY_BYTES} bytes")
    if raw.strip() and request.content_type not in ("application/json", "application/octet-stream", ""):
        raise Problem(415, "unsupported_media_type", "send the body as application/json")
    try:
        payload: Any = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise Problem(400, "validation_error", f"request body is not valid JSON: {exc}") from None
    return validate(model, payload)


def validate(model: type[Model], payload: Any) -> Model:
    """payload as model; 422 naming each field that does not fit."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = field_errors(exc)
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, "validation_error", detail, extra={"errors": errors}) from None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [{"field": ".".join(str(part) for part in error["loc"]) or "body", "message": error["msg"]}
            for error in exc.errors(include_url=False)]
