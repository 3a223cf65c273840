"""GET /openapi.json: the OpenAPI 3.1 document, generated from the router and each handler's declaration
(backend.http.endpoint): paths and methods as routed, scopes as enforced (the roles of each bearer
security requirement), bodies and replies as the pydantic models that validate them, each status's
problem codes as an enum, and the headers each answer carries (required where always sent). Built
once when the app is created; a route without a declaration fails create_app, so nothing can be served undocumented."""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import hdrs, web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from backend.appkeys import OPENAPI
from backend.http.commands import COMMAND_STATUS, DOMAIN_STATUS
from backend.http.endpoint import JSON, MIN_POSITION, MIN_POSITION_HEADER, NDJSON, SSE, Endpoint, declared, endpoint
from backend.http.problems import HTTP_ERROR_CODES, PROBLEM_CONTENT_TYPE, UNKNOWN_TYPE, UNREADABLE
from backend.http.replies import Problem
from backend.store.events import MAX_POSITION
from backend.streaming import schemas as event_schemas

BEARER = "bearer"
SSE_SCHEME = "streamToken"
API_VERSION = "1.0.0"
REF = "#/components/schemas/{model}"
POSITION = {"type": "integer", "minimum": 0, "maximum": MAX_POSITION}
IF_MATCH = r'^((W/)?"[0-9]{1,19}"|[0-9]{1,19}|\*)$'
SSE_EVENT = {
    "type": "object",
    "description": "one Server-Sent Event; `data` is JSON, `id` the global position to resume after. Event "
                   "frames are unnamed (onmessage receives them) unless ?event_names=true names them by type. "
                   "A stream refused for want of room (the key's cap, the server's, a shutdown) is a 200 "
                   "answer with `retry:` and one frame named `refused` whose data is problem+json, then its "
                   "end (header X-Stream-Refused: <code>): a browser comes back after that delay",
    "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "retry": {"type": "integer"},
                   "data": {"type": "string", "contentMediaType": "application/json"}},
}


def _sse_schema(frames: str | None) -> dict[str, Any]:
    if frames is None:
        return SSE_EVENT
    data = {**SSE_EVENT["properties"]["data"], "contentSchema": {"$ref": REF.format(model=frames)}}  # type: ignore[index]
    return {**SSE_EVENT, "properties": {**SSE_EVENT["properties"], "data": data}}  # type: ignore[dict-item]


def _command(method: str, spec: Endpoint) -> bool:
    """A POST or DELETE that runs a command (a POST without a body, such as a stream token's, does not)."""
    return method == "delete" or (method == "post" and spec.body is not None)
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

routes = web.RouteTableDef()


@routes.get("/openapi.json")
@endpoint(public=True)
async def openapi(request: web.Request) -> web.Response:
    """This document."""
    return web.Response(body=request.app[OPENAPI], content_type=JSON)


def document_bytes(app: web.Application) -> bytes:
    return orjson.dumps(document(app))


def document(app: web.Application) -> dict[str, Any]:
    operations = []
    for route in app.router.routes():
        if route.method == hdrs.METH_HEAD or route.resource is None:
            continue
        spec = declared(route.handler)
        if spec is None:
            raise LookupError(f"{route.method} {route.resource.canonical}: handler {route.handler!r} is not "
                              "declared with backend.http.endpoint (endpoint or command)")
        operations.append((route.method.lower(), route.resource.canonical, route.handler, spec))
    refs, schemas = _schemas([spec for *_, spec in operations])
    events = event_schemas.component_schemas(REF)
    if events.keys() & schemas.keys():
        raise LookupError(f"event schemas clash with reply models: {sorted(events.keys() & schemas.keys())}")
    schemas = {**schemas, **events}
    paths: dict[str, dict[str, Any]] = {}
    codes = set(UNROUTED_CODES)
    for method, path, handler, spec in operations:
        paths.setdefault(path, {})[method] = _operation(method, path, handler, spec, refs)
        codes.update(*_problem_statuses(method, path, spec).values())
    code = schemas["Problem"]["properties"]["code"]
    schemas["Problem"]["properties"]["code"] = {**code, "enum": sorted(codes)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tally",
            "version": API_VERSION,
            "description": "Event-sourced wallets, escrow locks, credit reservations, deposits and API keys. "
                           "Amounts are integers of minor units; ids are UUIDs; times RFC 3339 in UTC. Every "
                           "write answers with the global `position` of its events; a 2xx means they are "
                           "committed. Errors are RFC 9457 problem+json with a stable `code`.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                BEARER: {"type": "http", "scheme": "bearer",
                         "description": "an API key, tly_<key id>_<secret>; an operation's security requirement "
                                        "names the scope the key must hold (admin holds every scope)"},
                SSE_SCHEME: {"type": "apiKey", "in": "query", "name": "access_token",
                             "description": "streams only: a stream token (POST /v1/stream-tokens), for "
                                            "EventSource, which cannot send Authorization"},
            },
        },
    }


Refs = Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]]


def _schemas(specs: list[Endpoint]) -> tuple[Refs, dict[str, Any]]:
    """A $ref for each (model, mode) and the component schemas they point at."""
    wanted: set[tuple[type[BaseModel], JsonSchemaMode]] = {(Problem, "serialization")}
    for spec in specs:
        if spec.body is not None:
            wanted.add((spec.body, "validation"))
        if spec.reply is not None:
            wanted.add((spec.reply, "serialization"))
    ordered = sorted(wanted, key=lambda item: (item[0].__name__, item[1]))
    refs, top = models_json_schema(ordered, ref_template=REF)
    return refs, top.get("$defs", {})


def _operation(method: str, path: str, handler: Any, spec: Endpoint, refs: Refs) -> dict[str, Any]:
    summary, _, rest = (handler.__doc__ or handler.__name__).strip().partition("\n")
    description = " ".join(line.strip() for line in rest.splitlines() if line.strip())
    if spec.access:
        description = f"{description} Access: {spec.access}.".strip()
    operation: dict[str, Any] = {
        "operationId": f"{handler.__module__.rsplit('.', 1)[-1]}.{handler.__name__}",
        "summary": summary.strip(),
        "tags": [_tag(path)],
        "parameters": _parameters(method, path, spec),
        "responses": _responses(method, path, spec, refs),
    }
    if description:
        operation["description"] = description
    if spec.public:
        operation["security"] = []
    else:
        operation["security"] = [{BEARER: [spec.scope] if spec.scope else []}]
        if spec.content_type == SSE:
            operation["security"].append({SSE_SCHEME: []})
    if spec.body is not None:
        required = bool(spec.body.model_json_schema().get("required"))  # else an empty body reads as {}
        operation["requestBody"] = {"required": required, "content": {
            "application/json": {"schema": refs[(spec.body, "validation")]}}}
    return operation


def _tag(path: str) -> str:
    parts = path.strip("/").split("/")
    return parts[1] if parts[0] == "v1" and len(parts) > 1 else "operations"


def _parameters(method: str, path: str, spec: Endpoint) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in _PATH_PARAM.findall(path):
        uuid = name.endswith("_id") and name != "stream_id"
        params.append({"name": name, "in": "path", "required": True,
                       "schema": {"type": "string", "format": "uuid"} if uuid else {"type": "string"}})
    if spec.query is not None:
        query = spec.query.model_json_schema(ref_template=REF)
        required = set(query.get("required", ()))
        properties: dict[str, Any] = query.get("properties", {})
        for name, prop in properties.items():
            param = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if "array" in {prop.get("type"), *(choice.get("type") for choice in prop.get("anyOf", ()))}:
                param.update(style="form", explode=False)  # comma separated
            params.append(param)
    for extra in spec.params:
        params.append({"name": extra.name, "in": extra.location, "required": False,
                       "description": extra.description, "schema": dict(extra.schema)})
    if spec.reads_model:
        params += [
            {"name": MIN_POSITION, "in": "query", "required": False, "schema": POSITION,
             "description": "wait until the read model has applied this position (a write's `position`)"},
            {"name": MIN_POSITION_HEADER, "in": "header", "required": False, "schema": POSITION,
             "description": "the same as min_position"},
            {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "wait=N: how many seconds to wait for min_position (bounded by the server)"},
        ]
    if method == "post" and _command(method, spec):
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                       "description": "repeat the request safely: the first outcome is replayed byte for byte "
                                      "(Idempotent-Replayed: true), for at least 24 hours, per API key"})
        params.append({"name": "X-Correlation-ID", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                       "description": "recorded in the metadata of the events the command appends "
                                      "(default: the request id)"})
    if spec.etag:
        params.append({"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"},
                       "description": "the ETag of the copy the client holds: 304 without a body while it is "
                                      "current (`*` always)"})
    if spec.conditional:
        params.append({"name": "If-Match", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": IF_MATCH},
                       "description": "the stream version the command expects, as \"3\" (412 if it moved on); "
                                      "`*` sets no condition"})
    return params


# Problems the HTTP parser answers itself (backend.server.errors), before any middleware: no X-Request-ID.
PARSER_CODES = frozenset({"bad_request", "request_timeout", "uri_too_long", "header_too_large", "too_many_headers",
                          "expectation_failed"})
HEADERS: dict[str, tuple[str, dict[str, Any]]] = {
    "X-Request-ID": ("the request's id (the client's X-Request-ID if it is valid, else a fresh one), also in "
                     "problem bodies as request_id and in the server's logs", {"type": "string"}),
    "X-Position": ("global position of the last event the command appended", {"type": "string", "pattern": "^[0-9]+$"}),
    "Idempotent-Replayed": ("true: a replay of the first outcome of this Idempotency-Key",
                            {"type": "string", "enum": ["true"]}),
    "Location": ("what was created", {"type": "string"}),
    "X-Projection-Position": ("the read model's checkpoint this answer reflects (wait for a later one with "
                              "min_position)", {"type": "string", "pattern": "^[0-9]+$"}),
    "ETag": ('the version, as "3": send it as If-Match to write, as If-None-Match to read (304)',
             {"type": "string", "pattern": '^"[0-9]+"$'}),
    "Retry-After": ("seconds to wait before trying again", {"type": "string", "pattern": "^[0-9]+$"}),
    "WWW-Authenticate": ('Bearer realm="tally" (error="invalid_token" when a key was sent)', {"type": "string"}),
    "Cache-Control": ("no-store: no cache keeps a copy of the answer", {"type": "string"}),
    "X-Content-Type-Options": ("nosniff: the answer is only ever its declared type",
                               {"type": "string", "enum": ["nosniff"]}),
    "X-Accel-Buffering": ("no: a proxy (nginx) must pass the stream on as it comes",
                          {"type": "string", "enum": ["no"]}),
    "X-Tally-Worker": ("with `serve --workers N` only: the index (0 to N-1) of the worker that answered",
                       {"type": "string", "pattern": "^[0-9]+$"}),
    "X-Stream-Refused": ("on a stream refused for want of room: the problem's code (the body is one `refused` "
                         "frame, then the end)", {"type": "string", "enum": ["rate_limited", "unavailable"]}),
}
UNROUTED_CODES = frozenset({*HTTP_ERROR_CODES.values(), "http_error", "internal_error", "timeout"})
"""Codes no operation documents: an unknown path or method, a server bug (500), a handler too slow (504)."""
EXTRA_STATUS = {"unavailable": 503, UNKNOWN_TYPE: 400, UNREADABLE: 502}
"""Codes an endpoint may declare that neither a domain nor a command error carries."""


def _header(name: str, required: bool, description: str | None = None,
            schema: Mapping[str, object] | None = None) -> dict[str, Any]:
    known_description, known_schema = HEADERS.get(name, ("", {"type": "string"}))
    return {"description": description or known_description, "required": required,
            "schema": dict(schema or known_schema)}


def _responses(method: str, path: str, spec: Endpoint, refs: Refs) -> dict[str, Any]:
    success: dict[str, Any] = {"description": HTTPStatus(spec.status).phrase}
    if spec.reply is not None and spec.content_type == NDJSON:
        success["description"] = "one JSON object per line, each of the schema given"
    if spec.status != 204:
        if spec.reply is not None:
            schema = refs[(spec.reply, "serialization")]
        elif spec.content_type == SSE:
            schema = _sse_schema(spec.frames)
        else:
            schema = {"type": "object"} if spec.content_type == JSON else {"type": "string"}
        success["content"] = {spec.content_type: {"schema": schema}}
    success["headers"] = headers = _success_headers(method, spec)
    responses: dict[str, Any] = {str(spec.status): success}
    if spec.etag:
        responses["304"] = {"description": "Not Modified: If-None-Match names the current version (no body)",
                            "headers": {name: headers[name] for name in
                                        ("X-Request-ID", "ETag", "X-Projection-Position", "Cache-Control",
                                         "X-Content-Type-Options") if name in headers}}
    problem = refs[(Problem, "serialization")]
    for status, codes in sorted(_problem_statuses(method, path, spec).items()):
        schema = {"allOf": [problem, {"properties": {"code": {"enum": codes}}}]}
        responses[str(status)] = {"description": "codes: " + ", ".join(codes),
                                  "headers": _problem_headers(status, codes, method, spec),
                                  "content": {PROBLEM_CONTENT_TYPE: {"schema": schema}}}
    return responses


def _success_headers(method: str, spec: Endpoint) -> dict[str, Any]:
    headers = {"X-Request-ID": _header("X-Request-ID", True), "X-Tally-Worker": _header("X-Tally-Worker", False),
               "Cache-Control": _header("Cache-Control", True),
               "X-Content-Type-Options": _header("X-Content-Type-Options", spec.content_type != SSE)}
    if _command(method, spec):
        headers["X-Position"] = _header("X-Position", True)
        headers["Idempotent-Replayed"] = _header("Idempotent-Replayed", False)
    if spec.creates is not None:
        headers["Location"] = _header("Location", True, f"what was created: {spec.creates}")
    if spec.reads_model:
        headers["X-Projection-Position"] = _header("X-Projection-Position", True)
    if spec.etag:
        headers["ETag"] = _header("ETag", True)
    if spec.content_type == SSE:
        headers["Cache-Control"] = _header("Cache-Control", True, "no-cache")
        headers["X-Accel-Buffering"] = _header("X-Accel-Buffering", False)
        headers["X-Stream-Refused"] = _header("X-Stream-Refused", False)
        headers["Retry-After"] = _header("Retry-After", False, "on a refused stream: seconds before coming back")
    for extra in spec.headers:
        headers[extra.name] = _header(extra.name, extra.required, extra.description, extra.schema)
    return headers


def _problem_headers(status: int, codes: list[str], method: str, spec: Endpoint) -> dict[str, Any]:
    from_app = not PARSER_CODES & set(codes)  # the parser's own answers carry none of these
    headers = {"X-Request-ID": _header("X-Request-ID", from_app), "X-Tally-Worker": _header("X-Tally-Worker", False),
               "Cache-Control": _header("Cache-Control", from_app),
               "X-Content-Type-Options": _header("X-Content-Type-Options", from_app)}
    if status == 401:
        headers["WWW-Authenticate"] = _header("WWW-Authenticate", True)
    if status in (429, 503):
        headers["Retry-After"] = _header("Retry-After", True)
    if spec.reads_model and status in (404, 503):
        headers["X-Projection-Position"] = _header("X-Projection-Position", False)
    if _command(method, spec) and any(code in DOMAIN_STATUS for code in codes):
        headers["Idempotent-Replayed"] = _header("Idempotent-Replayed", False)
    return headers


def _problem_statuses(method: str, path: str, spec: Endpoint) -> dict[int, list[str]]:
    statuses: dict[int, list[str]] = {}

    def add(status: int, *codes: str) -> None:
        known = statuses.setdefault(status, [])
        known += [code for code in codes if code not in known]

    add(400, "validation_error")  # any request: a malformed one, a query parameter it does not take, a NUL (%00)
    # Any request the HTTP parser refuses (backend.server.errors): bare CR/LF, control characters,
    # bad framing; a request line over 8 KiB; a header over 8 KiB or too many; a head sent too slowly.
    add(400, "bad_request")
    add(408, "request_timeout")
    add(414, "uri_too_long")
    add(431, "header_too_large", "too_many_headers")
    add(417, "expectation_failed")  # an Expect other than 100-continue
    if not spec.public:
        add(401, "unauthorized")
        add(403, "forbidden")
        if spec.content_type != SSE:  # a stream's are refusals inside its 200 answer (backend/http/refusals.py)
            add(429, "rate_limited")
            add(503, "unavailable")
    if _PATH_PARAM.search(path):
        add(404, "not_found")
    if spec.reads_model:
        add(503, "unavailable")
    if spec.body is not None:
        add(413, "payload_too_large")
        add(415, "unsupported_media_type")
        add(422, "validation_error")
    if _command(method, spec):
        add(409, "wrong_expected_version", "idempotency_in_flight")
        add(422, "idempotency_conflict")
    for code in spec.errors:
        add(DOMAIN_STATUS.get(code) or COMMAND_STATUS.get(code) or EXTRA_STATUS[code], code)
    if spec.conditional:
        add(412, "precondition_failed")
    return statuses
