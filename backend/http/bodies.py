"""Request bodies: JSON parsed with orjson and validated by a pydantic model, or a clear 4xx."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from backend.http.problems import Problem

Model = TypeVar("Model", bound=BaseModel)

MAX_BODY_BYTES = 64 * 1024


async def read_json(request: web.Request, model: type[Model]) -> Model:
    raw = await request.read()
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
