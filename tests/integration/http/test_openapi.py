"""GET /openapi.json: a valid OpenAPI 3.1 document that names every route, the scope each enforces, and
schemas that the bytes on the wire satisfy (checked here against real answers, errors included)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
import pytest
from aiohttp import web
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from backend.app import create_app
from backend.appkeys import COMMANDS, POOL, REPOSITORY
from backend.commands.bus import Decision, IdempotencyKey
from backend.commands.context import SYSTEM, CommandContext
from backend.domain import SCOPES, Wallet, wallet_stream
from backend.http import replies, static
from backend.http.commands import Answer
from backend.http.openapi import document
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client

# The scope each route requires (README, HTTP API) (the SSE streams decide by owner instead).
REQUIRED_SCOPES = {
    ("post", "/v1/wallets"): "wallets:write",
    ("get", "/v1/wallets/{wallet_id}"): "wallets:read",
    ("get", "/v1/wallets"): "wallets:read",
    ("post", "/v1/wallets/{wallet_id}/credits"): "admin",
    ("post", "/v1/wallets/{wallet_id}/debits"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/locks"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/locks/{lock_id}/release"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/locks/{lock_id}/settle"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/reservations"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/reservations/{reservation_id}/confirm"): "wallets:write",
    ("post", "/v1/wallets/{wallet_id}/reservations/{reservation_id}/rollback"): "wallets:write",
    ("get", "/v1/reservations/{reservation_id}"): "wallets:read",
    ("post", "/v1/deposits"): "deposits:write",
    ("post", "/v1/deposits/{deposit_id}/status"): "deposits:admin",
    ("get", "/v1/deposits/{deposit_id}"): "wallets:read",
    ("post", "/v1/api-keys"): "admin",
    ("get", "/v1/api-keys"): "admin",
    ("get", "/v1/api-keys/{key_id}"): "admin",
    ("delete", "/v1/api-keys/{key_id}"): "admin",
    ("get", "/v1/stats"): "wallets:read",
    ("get", "/v1/projections"): "admin",
    ("get", "/v1/events"): "audit:read",
    ("get", "/v1/streams/{stream_id}/events"): "audit:read",
    ("get", "/v1/events/export"): "audit:read",
    ("get", "/v1/wallets/{wallet_id}/state"): "audit:read",
    ("get", "/v1/audit/verify"): "audit:read",
    ("get", "/v1/audit/tree"): "audit:read",
    ("get", "/v1/audit/proofs/inclusion"): "audit:read",
    ("get", "/v1/audit/proofs/consistency"): "audit:read",
    ("get", "/v1/audit/checkpoints"): "audit:read",
    ("get", "/v1/audit/checkpoints/latest"): "audit:read",
    ("post", "/v1/audit/checkpoints"): "admin",
    ("get", "/v1/audit/public-key"): "audit:read",
}
PUBLIC = {"/health/live", "/health/ready", "/metrics", "/openapi.json"} | {route for route, *_ in static.FILES}


@pytest.fixture
async def doc(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = orjson.loads(await response.read())
    assert isinstance(body, dict)
    return body


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, item in doc["paths"].items() for method, op in item.items()}


def fill(path: str) -> str:
    """The path with a fresh id in each placeholder."""
    return re.sub(r"\{[a-z_]+\}", lambda _: str(uuid.uuid4()), path)


class Conformance:
    """Checks answers against the schemas the served document gives their status and content type."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.ops = operations(doc)
        self.checked: set[str] = set()

    def check(self, method: str, path: str, status: int, content_type: str, body: Any) -> None:
        documented = self.ops[(method, path)]["responses"]
        assert str(status) in documented, f"{method} {path} answered {status}, not documented"
        content = documented[str(status)]["content"][content_type]
        schema = {**content["schema"], "components": self.doc["components"]}
        errors = sorted(Draft202012Validator(schema).iter_errors(body), key=str)
        assert not errors, f"{method} {path} {status}: {[e.message for e in errors]}"
        schema = content["schema"].get("allOf", [content["schema"]])[0]  # a problem: allOf [Problem, its codes]
        self.checked.add(schema.get("$ref", "").rpartition("/")[2])

    async def call(self, client: Client, method: str, template: str, path: str, token: str, *,
                   status: int, body: Any = None, params: dict[str, str] | None = None,
                   headers: dict[str, str] | None = None) -> Any:
        response = await client.request(method.upper(), path, json=body, params=params,
                                        headers={**bearer(token), **(headers or {})})
        raw = await response.read()
        assert response.status == status, raw
        if status == 204:
            return None
        parsed = orjson.loads(raw)
        self.check(method, template, status, response.content_type, parsed)
        return parsed


async def test_the_document_is_public_and_valid_openapi_3_1(client: Client, doc: dict[str, Any]) -> None:
    validate_openapi(doc)
    assert doc["openapi"].startswith("3.1")
    schemes = doc["components"]["securitySchemes"]
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert (schemes["streamToken"]["in"], schemes["streamToken"]["name"]) == ("query", "access_token")
    assert len({op["operationId"] for op in operations(doc).values()}) == len(operations(doc))


SCHEMA_KEYWORDS = frozenset(Draft202012Validator.VALIDATORS) | {
    "$schema", "$id", "$ref", "$defs", "$comment", "$anchor", "$dynamicAnchor", "title", "description",
    "default", "examples", "deprecated", "readOnly", "writeOnly", "format", "contentMediaType", "contentSchema",
    "contentEncoding", "discriminator", "example", "externalDocs", "xml"}
"""JSON Schema 2020-12's keywords and OpenAPI 3.1's additions: a validator ignores any other key, so a
bound written under another name (pydantic's `ge`) would hold on the server and nowhere else."""
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties")


def schemas_in(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every schema object of the document and its subschemas, each with where it is."""
    found: list[tuple[str, dict[str, Any]]] = []

    def schema(where: str, value: Any) -> None:
        if not isinstance(value, dict):
            return  # additionalProperties: false
        found.append((where, value))
        for key in SUBSCHEMA_MAPS:
            for name, sub in value.get(key, {}).items():
                schema(f"{where}.{key}.{name}", sub)
        for key in SUBSCHEMA_LISTS:
            for index, sub in enumerate(value.get(key, [])):
                schema(f"{where}.{key}[{index}]", sub)
        for key in SUBSCHEMAS:
            schema(f"{where}.{key}", value.get(key))

    def media(where: str, content: dict[str, Any]) -> None:
        for media_type, body in content.items():
            schema(f"{where}.{media_type}", body.get("schema"))

    for name, value in doc["components"]["schemas"].items():
        schema(f"components.{name}", value)
    for (method, path), op in operations(doc).items():
        for parameter in op.get("parameters", []):
            schema(f"{method} {path} ?{parameter['name']}", parameter.get("schema"))
            media(f"{method} {path} ?{parameter['name']}", parameter.get("content", {}))
        media(f"{method} {path} body", op.get("requestBody", {}).get("content", {}))
        for status, response in op.get("responses", {}).items():
            media(f"{method} {path} {status}", response.get("content", {}))
            for header, spec in response.get("headers", {}).items():
                schema(f"{method} {path} {status} {header}", spec.get("schema"))
    return found


async def test_every_schema_says_its_constraints_in_json_schema_keywords(doc: dict[str, Any]) -> None:
    found = schemas_in(doc)
    assert any("minimum" in value for _, value in found)  # the walk reaches the parameters' bounds
    unknown = {where: sorted(set(value) - SCHEMA_KEYWORDS) for where, value in found
               if not set(value) <= SCHEMA_KEYWORDS}
    assert unknown == {}
    limit = next(p for p in operations(doc)["get", "/v1/events"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)


async def test_every_route_is_documented_and_every_operation_routed(
    client: Client, doc: dict[str, Any]
) -> None:
    routed = {(route.method.lower(), route.resource.canonical) for route in client.app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    assert set(operations(doc)) == routed


def required_scope(op: dict[str, Any]) -> str | None:
    """The scope an operation's bearer security requirement names (OpenAPI 3.1: roles of any scheme)."""
    scopes = [scope for requirement in op["security"] for scope in requirement.get("bearer", [])]
    assert len(scopes) <= 1, op["security"]
    return scopes[0] if scopes else None


async def test_scopes_are_the_design_contract(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    documented = {key: scope for key, op in ops.items() if (scope := required_scope(op)) is not None}
    assert documented == REQUIRED_SCOPES
    assert not any(name.startswith("x-") for op in ops.values() for name in op)
    for (_, path), op in ops.items():
        assert (op["security"] == []) == (path in PUBLIC), path
        streams = path in ("/v1/streams/events", "/v1/streams/dashboard", "/v1/streams/wallets/{wallet_id}")
        assert {name for requirement in op["security"] for name in requirement} == (
            set() if path in PUBLIC else {"bearer", "streamToken"} if streams else {"bearer"}), path
    for path in ("/v1/streams/events", "/v1/streams/dashboard", "/v1/streams/wallets/{wallet_id}"):
        assert "audit:read" in ops[("get", path)]["description"]
        # a stream's 429 and 503 are refusals inside its 200 answer, which a browser retries
        assert not {"429", "503"} & ops[("get", path)]["responses"].keys(), path


async def test_each_documented_scope_is_enforced_before_anything_else(
    client: Client, doc: dict[str, Any]
) -> None:
    """A key holding every other scope gets 403 naming the missing one, even with a body that would be
    refused and ids that do not exist; a key holding just that scope gets past the check."""
    app = client.app
    for (method, path), op in operations(doc).items():
        scope = required_scope(op)
        if scope is None:
            continue
        others = sorted(SCOPES - {scope, "admin"})
        lacking = await mint_token(app, f"owner-{uuid.uuid4().hex[:8]}", others)
        response = await client.request(method.upper(), fill(path), data=b"{not json", headers=bearer(lacking))
        problem = await response.json(content_type=None)
        assert response.status == 403, (method, path, problem)
        assert problem["code"] == "forbidden" and f"'{scope}'" in problem["detail"], problem
        holding = await mint_token(app, f"owner-{uuid.uuid4().hex[:8]}", [scope])
        response = await client.request(method.upper(), fill(path), json={}, headers=bearer(holding))
        await response.read()
        assert response.status != 403, (method, path)


async def test_every_operation_refuses_a_query_parameter_it_does_not_document(
    client: Client, doc: dict[str, Any]
) -> None:
    """What the document lists is all an endpoint takes: anything else is a 400 naming it, before the body
    is read. Public endpoints take anything (they read no input)."""
    token = await mint_token(client.app, "strict", sorted(SCOPES))
    for (method, path), op in operations(doc).items():
        documented = {p["name"] for p in op["parameters"] if p["in"] == "query"}
        assert "nonesuch" not in documented
        response = await client.request(method.upper(), fill(path), params={"nonesuch": "1"}, data=b"{not json",
                                        headers=bearer(token))
        answer = await response.read()
        if path in PUBLIC:
            assert response.status < 400, (method, path, answer)
            continue
        problem = orjson.loads(answer)
        assert (response.status, problem["code"]) == (400, "validation_error"), (method, path, answer)
        assert problem["errors"] == [{"field": "nonesuch", "message": "this endpoint takes no such query parameter"}], \
            (method, path, answer)  # the same words everywhere


async def test_request_schemas_are_the_validating_models(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    movement = schemas["Movement"]
    assert movement["additionalProperties"] is False
    assert movement["required"] == ["amount", "reference"]
    amount = movement["properties"]["amount"]
    assert (amount["type"], amount["exclusiveMinimum"], amount["maximum"]) == ("integer", 0, 2**63 - 1)
    assert "USD" in schemas["OpenWallet"]["properties"]["currency"]["enum"]
    assert schemas["DepositStatusChange"]["required"] == ["status"]
    debit = operations(doc)[("post", "/v1/wallets/{wallet_id}/debits")]
    assert debit["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Movement"}
    assert {p["name"] for p in debit["parameters"]} >= {"wallet_id", "Idempotency-Key", "If-Match"}
    assert debit["responses"]["422"]["description"].endswith("insufficient_funds")
    confirm = operations(doc)[("post", "/v1/wallets/{wallet_id}/reservations/{reservation_id}/confirm")]
    assert {"reservation_expired", "reservation_not_open"} <= set(
        confirm["responses"]["409"]["description"].removeprefix("codes: ").split(", "))
    events = operations(doc)[("get", "/v1/events")]
    assert [p["name"] for p in events["parameters"]] == ["cursor", "limit", "types", "stream_prefix", "from_time",
                                                        "to_time"]
    for path in ("/v1/events", "/v1/streams/events"):  # a filter by type naming no type the log holds
        codes = operations(doc)[("get", path)]["responses"]["400"]["description"].removeprefix("codes: ")
        assert "unknown_event_type" in codes.split(", "), path


async def test_answers_match_the_documented_schemas(client: Client, doc: dict[str, Any]) -> None:
    """Every JSON answer of a full tour of the API, success and problem alike, fits its schema."""
    app = client.app
    owner = f"tour-{uuid.uuid4().hex[:8]}"
    admin = await mint_token(app, owner, ["admin"])
    c = Conformance(doc)

    def wallet_path(suffix: str = "") -> str:
        return "/v1/wallets/{wallet_id}" + suffix

    payer = await c.call(client, "post", "/v1/wallets", "/v1/wallets", admin, status=201,
                         body={"owner": owner, "currency": "USD"})
    payee = await c.call(client, "post", "/v1/wallets", "/v1/wallets", admin, status=201,
                         body={"owner": owner, "currency": "USD"})
    wid, pid = payer["wallet_id"], payee["wallet_id"]
    await c.call(client, "post", wallet_path("/credits"), f"/v1/wallets/{wid}/credits", admin, status=200,
                 body={"amount": 1000, "reference": "seed"})
    await c.call(client, "post", wallet_path("/debits"), f"/v1/wallets/{wid}/debits", admin, status=200,
                 body={"amount": 1, "reference": "fee"})
    await c.call(client, "post", wallet_path("/debits"), f"/v1/wallets/{wid}/debits", admin, status=422,
                 body={"amount": 10**6, "reference": "too much"})
    await c.call(client, "post", wallet_path("/debits"), f"/v1/wallets/{wid}/debits", admin, status=422,
                 body={"amount": 1.5, "reference": "float"})
    lock = await c.call(client, "post", wallet_path("/locks"), f"/v1/wallets/{wid}/locks", admin, status=201,
                        body={"amount": 100, "reason": "escrow"})
    lock2 = await c.call(client, "post", wallet_path("/locks"), f"/v1/wallets/{wid}/locks", admin, status=201,
                         body={"amount": 50, "reason": "escrow"})
    await c.call(client, "post", wallet_path("/locks/{lock_id}/settle"),
                 f"/v1/wallets/{wid}/locks/{lock['lock_id']}/settle", admin, status=200, body={"to_wallet_id": pid})
    last = await c.call(client, "post", wallet_path("/locks/{lock_id}/release"),
                        f"/v1/wallets/{wid}/locks/{lock2['lock_id']}/release", admin, status=200)
    await c.call(client, "post", wallet_path("/locks/{lock_id}/release"),
                 f"/v1/wallets/{wid}/locks/{lock2['lock_id']}/release", admin, status=409)
    held = await c.call(client, "post", wallet_path("/reservations"), f"/v1/wallets/{wid}/reservations", admin,
                        status=201, body={"amount": 30, "ttl_seconds": 600})
    await c.call(client, "post", wallet_path("/reservations/{reservation_id}/confirm"),
                 f"/v1/wallets/{wid}/reservations/{held['reservation_id']}/confirm", admin, status=200,
                 body={"amount": 20})
    held2 = await c.call(client, "post", wallet_path("/reservations"), f"/v1/wallets/{wid}/reservations", admin,
                         status=201, body={"amount": 5, "ttl_seconds": 600})
    last = await c.call(client, "post", wallet_path("/reservations/{reservation_id}/rollback"),
                        f"/v1/wallets/{wid}/reservations/{held2['reservation_id']}/rollback", admin, status=200)
    await c.call(client, "post", wallet_path("/debits"), f"/v1/wallets/{wid}/debits", admin, status=412,
                 body={"amount": 1, "reference": "stale"}, headers={"If-Match": '"1"'})
    deposit = await c.call(client, "post", "/v1/deposits", "/v1/deposits", admin, status=201,
                           body={"wallet_id": wid, "currency": "USD"})
    did = deposit["deposit_id"]
    await c.call(client, "post", "/v1/deposits/{deposit_id}/status", f"/v1/deposits/{did}/status", admin,
                 status=200, body={"status": "confirming", "confirmations": 1})
    last = await c.call(client, "post", "/v1/deposits/{deposit_id}/status", f"/v1/deposits/{did}/status", admin,
                        status=200, body={"status": "confirmed", "confirmations": 6, "amount": 7,
                                          "chain_tx_id": uuid.uuid4().hex})
    await c.call(client, "post", "/v1/deposits/{deposit_id}/status", f"/v1/deposits/{did}/status", admin,
                 status=409, body={"status": "pending"})
    key = await c.call(client, "post", "/v1/api-keys", "/v1/api-keys", admin, status=201,
                       body={"owner": owner, "name": "tour", "scopes": ["wallets:read"]})
    assert key["secret"].startswith("tly_")
    await c.call(client, "delete", "/v1/api-keys/{key_id}", f"/v1/api-keys/{key['key_id']}", admin, status=204)

    read = {"min_position": str(last["position"] + 1)}  # the revocation's position is one past
    await c.call(client, "get", wallet_path(), f"/v1/wallets/{wid}", admin, status=200, params=read)
    await c.call(client, "get", "/v1/wallets", "/v1/wallets", admin, status=200, params={"owner": owner})
    await c.call(client, "get", "/v1/reservations/{reservation_id}", f"/v1/reservations/{held['reservation_id']}",
                 admin, status=200, params=read)
    await c.call(client, "get", "/v1/deposits/{deposit_id}", f"/v1/deposits/{did}", admin, status=200, params=read)
    await c.call(client, "get", "/v1/deposits/{deposit_id}", f"/v1/deposits/{uuid.uuid4()}", admin, status=404)
    await c.call(client, "get", "/v1/api-keys", "/v1/api-keys", admin, status=200, params={"owner": owner})
    await c.call(client, "get", "/v1/stats", "/v1/stats", admin, status=200, params=read)
    await c.call(client, "get", "/v1/projections", "/v1/projections", admin, status=200)
    auditor = await mint_token(app, owner, ["audit:read"])
    await c.call(client, "get", "/v1/events", "/v1/events", auditor, status=200,
                 params={"cursor": str(max(0, payer["position"] - 1)), "limit": "50"})
    await c.call(client, "get", "/v1/streams/{stream_id}/events", f"/v1/streams/{wallet_stream(uuid.UUID(wid))}"
                 "/events", auditor, status=200)
    await c.call(client, "get", wallet_path("/state"), f"/v1/wallets/{wid}/state", auditor, status=200,
                 params={"at_position": str(last["position"])})
    await c.call(client, "get", "/v1/audit/verify", "/v1/audit/verify", auditor, status=200,
                 params={"stream": wallet_stream(uuid.UUID(wid))})
    response = await client.get("/v1/events/export", headers=bearer(auditor),
                                params={"after": str(payer["position"] - 1), "to": str(last["position"])})
    lines = (await response.read()).splitlines()
    assert response.status == 200 and len(lines) == last["position"] - payer["position"] + 1
    for line in lines:
        c.check("get", "/v1/events/export", 200, "application/x-ndjson", orjson.loads(line))

    assert c.checked >= {
        "WalletWrite", "LockWrite", "SettleWrite", "ReserveWrite", "ReservationWrite", "DepositWrite",
        "CreatedApiKey", "WalletDetail", "WalletPage", "Reservation", "Deposit", "ApiKeyPage", "Stats",
        "Projections", "EventPage", "StreamPage", "WalletState", "VerifyReport", "RecordedEvent", "Problem"}


async def test_a_body_that_does_not_fit_its_reply_model_appends_nothing(client: Client) -> None:
    """A handler's answer that drifts from its model is a server bug: it fails its own request, and
    when an Idempotency-Key would store the answer, before any of its events are appended."""
    app = client.app
    owner = f"drift-{uuid.uuid4().hex[:8]}"
    created = await client.post("/v1/wallets", json={"owner": owner, "currency": "USD"},
                                headers=bearer(await mint_token(app, owner, ["wallets:write"])))
    wallet_id = uuid.UUID((await created.json())["wallet_id"])
    repository = app[REPOSITORY]

    async def decide(ctx: CommandContext) -> Decision:
        wallet = await repository.find(Wallet, wallet_id)
        assert wallet is not None
        wallet.credit(5, "drift", ctx.now)
        return Decision([wallet], {**wallet.view(ctx.now).as_dict(), "undocumented": True})

    idem = IdempotencyKey("drift-test", uuid.uuid4().hex, b"fingerprint")
    with pytest.raises(ValueError, match="undocumented"):
        await app[COMMANDS].execute(CommandContext(SYSTEM), [wallet_stream(wallet_id)], decide,
                                    idem, Answer(replies.WalletWrite).check)
    events = await repository.store.read_stream(wallet_stream(wallet_id))
    assert [event.type for event in events] == ["WalletOpened"]
    async with app[POOL].acquire() as conn:
        assert await conn.fetchval("select count(*) from idempotency_keys where scope = $1", idem.scope) == 0


def test_a_route_without_a_declaration_cannot_be_served(database_url: str) -> None:
    app = create_app(make_settings(database_url))
    document(app)  # every route of the app is declared

    async def undeclared(request: web.Request) -> web.Response:
        return web.Response()

    bare = create_app(make_settings(database_url))
    bare.router.add_get("/v1/undeclared", undeclared)
    with pytest.raises(LookupError, match="/v1/undeclared"):
        document(bare)
