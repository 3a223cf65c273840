"""Error format at the edges: unknown routes, wrong methods, bad JSON, request ids."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, ConfigDict

from backend.app import create_app
from backend.config import Settings
from backend.http.bodies import read_json
from tests.conftest import bearer, mint_token

PROBLEM = "application/problem+json"


async def test_unknown_route_is_problem_json_404(client: TestClient) -> None:
    response = await client.get("/v1/nowhere")
    assert response.status == 404
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "not_found"
    assert body["status"] == 404
    assert {"type", "title", "detail"} <= body.keys()


async def test_wrong_method_is_problem_json_405_with_allow(client: TestClient) -> None:
    response = await client.delete("/health/live")
    assert response.status == 405
    assert response.content_type == PROBLEM
    assert "GET" in response.headers["Allow"]
    assert (await response.json(content_type=PROBLEM))["code"] == "method_not_allowed"


async def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    echoed = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = await client.get("/health/live", headers={"X-Request-ID": "bad id with spaces"})
    assert len(generated.headers["X-Request-ID"]) == 32
    missing = await client.get("/nowhere")
    assert missing.headers["X-Request-ID"] == (await missing.json(content_type=PROBLEM))["request_id"]


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount: int


async def echo(request: web.Request) -> web.Response:
    body = await read_json(request, Echo)
    return web.json_response(body.model_dump())


async def test_bad_json_and_invalid_fields_are_clear_4xx(aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings)
    app.router.add_post("/echo", echo)
    client = await aiohttp_client(app)
    client.session.headers.update(bearer(await mint_token(app, "someone", ["wallets:read"])))

    broken = await client.post("/echo", data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status == 400
    assert (await broken.json(content_type=PROBLEM))["code"] == "validation_error"

    invalid = await client.post("/echo", json={"amount": 1.5, "extra": 1})
    assert invalid.status == 422
    body = await invalid.json(content_type=PROBLEM)
    assert body["code"] == "validation_error"
    assert {e["field"] for e in body["errors"]} == {"amount", "extra"}

    ok = await client.post("/echo", json={"amount": 7})
    assert ok.status == 200
    assert await ok.json() == {"amount": 7}


async def test_liveness_and_readiness(client: TestClient) -> None:
    assert (await client.get("/health/live")).status == 200
    ready = await client.get("/health/ready")
    assert ready.status == 200
    checks = (await ready.json())["checks"]
    assert checks["database"] == "ok"
    assert {"balances", "stats"} <= set(checks["projections"])
    assert all({"state", "lag_events", "lag_s"} <= set(p) for p in checks["projections"].values())
