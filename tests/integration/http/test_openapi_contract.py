"""Every answer of a representative tour of the API, success and error alike, is as the served
/openapi.json says: a documented status and content type, a body that fits the schema (a problem's
`code` among the codes documented for that status), each required header present and no Tally header
sent that is not declared (tests/integration/http/contract.py). Conditional GETs answer 304 with the
ETag and no body."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.domain import wallet_stream
from backend.http import static
from tests.conftest import make_settings, mint_token
from tests.integration.http.contract import Contract, ContractClient, ContractError
from tests.support import Client, eventually


async def served_contract(client: Client) -> Contract:
    response = await client.get("/openapi.json")
    assert response.status == 200
    return Contract(orjson.loads(await response.read()))


@pytest.fixture
async def api(client: Client) -> ContractClient:
    return ContractClient(client, await served_contract(client))


async def test_a_tour_of_the_api_answers_as_documented(api: ContractClient) -> None:
    app = api.client.app
    owner = f"tour-{uuid.uuid4().hex[:8]}"
    admin = await mint_token(app, owner, ["admin"])
    auditor = await mint_token(app, owner, ["audit:read"])
    reader = await mint_token(app, owner, ["wallets:read"])
    call = api.json

    # wallets and their commands
    payer = await call("POST", "/v1/wallets", admin, status=201, json={"owner": owner, "currency": "USD"})
    payee = await call("POST", "/v1/wallets", admin, status=201, json={"owner": owner, "currency": "USD"})
    wid, pid = payer["wallet_id"], payee["wallet_id"]
    w = f"/v1/wallets/{wid}"
    await call("POST", f"{w}/credits", admin, status=200, json={"amount": 1000, "reference": "seed"})
    await call("POST", f"{w}/debits", admin, status=200, json={"amount": 1, "reference": "fee"})
    lock = await call("POST", f"{w}/locks", admin, status=201, json={"amount": 100, "reason": "escrow"})
    lock2 = await call("POST", f"{w}/locks", admin, status=201, json={"amount": 50, "reason": "escrow"})
    await call("POST", f"{w}/locks/{lock['lock_id']}/settle", admin, status=200, json={"to_wallet_id": pid})
    await call("POST", f"{w}/locks/{lock2['lock_id']}/release", admin, status=200)
    held = await call("POST", f"{w}/reservations", admin, status=201, json={"amount": 30, "ttl_seconds": 600})
    await call("POST", f"{w}/reservations/{held['reservation_id']}/confirm", admin, status=200, json={"amount": 20})
    held2 = await call("POST", f"{w}/reservations", admin, status=201, json={"amount": 5, "ttl_seconds": 600})
    await call("POST", f"{w}/reservations/{held2['reservation_id']}/rollback", admin, status=200)

    # Idempotency-Key replays: a create (Location names the first wallet) and a refusal
    idem = {"Idempotency-Key": uuid.uuid4().hex}
    first, _ = await api.request("POST", "/v1/wallets", admin, status=201, headers=idem,
                                 json={"owner": owner, "currency": "EUR"})
    again, _ = await api.request("POST", "/v1/wallets", admin, status=201, headers=idem,
                                 json={"owner": owner, "currency": "EUR"})
    assert again.headers["Idempotent-Replayed"] == "true" and again.headers["Location"] == first.headers["Location"]
    refused = {"Idempotency-Key": uuid.uuid4().hex}
    for _ in range(2):
        await api.request("POST", f"{w}/debits", admin, status=422, headers=refused,
                          json={"amount": 10**6, "reference": "too much"})

    # errors: 400, 401, 403, 404, 409, 412, 415, 422
    await call("GET", "/v1/wallets", admin, status=400, params={"nonesuch": "1"})
    await call("GET", "/v1/wallets", admin, status=400, params={"limit": "0"})
    await call("POST", f"{w}/debits", admin, status=400, headers={"If-Match": "x"},
               json={"amount": 1, "reference": "bad"})
    await call("POST", f"{w}/debits", admin, status=400, headers={"Content-Type": "application/json"}, data=b"{")
    await call("GET", w, None, status=401)
    await call("GET", w, "tly_nonesuch_nonesuch", status=401)
    await call("POST", f"{w}/credits", reader, status=403, json={"amount": 1, "reference": "x"})
    await call("GET", "/v1/events", reader, status=403)
    await call("GET", f"/v1/wallets/{uuid.uuid4()}", admin, status=404)
    await call("GET", "/v1/wallets/not-a-uuid", admin, status=404)
    await call("POST", f"/v1/wallets/{uuid.uuid4()}/debits", admin, status=404, json={"amount": 1, "reference": "x"})
    await call("POST", f"{w}/locks/{lock2['lock_id']}/release", admin, status=409)
    await call("POST", f"{w}/debits", admin, status=412, headers={"If-Match": '"1"'},
               json={"amount": 1, "reference": "stale"})
    await call("POST", f"{w}/debits", admin, status=415, headers={"Content-Type": "text/plain"}, data=b"{}")
    await call("POST", f"{w}/debits", admin, status=422, json={"amount": 1.5, "reference": "float"})
    lock3 = await call("POST", f"{w}/locks", admin, status=201, json={"amount": 1, "reason": "self"})
    await call("POST", f"{w}/locks/{lock3['lock_id']}/settle", admin, status=422, json={"to_wallet_id": wid})

    # deposits
    deposit = await call("POST", "/v1/deposits", admin, status=201, json={"wallet_id": wid, "currency": "USD"})
    did = deposit["deposit_id"]
    await call("POST", f"/v1/deposits/{did}/status", admin, status=200,
               json={"status": "confirming", "confirmations": 1})
    await call("POST", f"/v1/deposits/{did}/status", admin, status=200,
               json={"status": "confirmed", "confirmations": 6, "amount": 7, "chain_tx_id": uuid.uuid4().hex})
    await call("POST", f"/v1/deposits/{did}/status", admin, status=409, json={"status": "pending"})
    await call("POST", "/v1/deposits", admin, status=422, json={"wallet_id": wid, "currency": "EUR"})

    # keys
    key = await call("POST", "/v1/api-keys", admin, status=201,
                     json={"owner": owner, "name": "tour", "scopes": ["wallets:read"]})
    k = f"/v1/api-keys/{key['key_id']}"
    await call("DELETE", k, admin, status=412, headers={"If-Match": '"7"'})
    shown, _ = await api.request("GET", k, admin, status=200, params={"min_position": str(key["position"])})
    await api.request("GET", k, admin, status=304, headers={"If-None-Match": shown.headers["ETag"]})
    await call("GET", f"/v1/api-keys/{uuid.uuid4()}", admin, status=404)
    revoked, _ = await api.request("DELETE", k, admin, status=204, headers={"If-Match": shown.headers["ETag"]})
    changed, _ = await api.request("GET", k, admin, status=200, params={"min_position": revoked.headers["X-Position"]},
                                   headers={"If-None-Match": shown.headers["ETag"]})
    assert changed.headers["ETag"] == '"2"'
    await call("DELETE", f"/v1/api-keys/{key['key_id']}", admin, status=409)
    last = int(revoked.headers["X-Position"])

    # reads, with read-your-writes, and conditional GETs
    read = {"min_position": str(last)}
    wallet, _ = await api.request("GET", w, reader, status=200, params=read)
    etag = wallet.headers["ETag"]
    for tag in (etag, f"W/{etag}", f'"0", {etag}', "*"):
        same, body = await api.request("GET", w, reader, status=304, headers={"If-None-Match": tag})
        assert same.headers["ETag"] == etag and body == b""
    await api.request("GET", w, reader, status=200, headers={"If-None-Match": '"0"'})
    dep, _ = await api.request("GET", f"/v1/deposits/{did}", reader, status=200, params=read)
    await api.request("GET", f"/v1/deposits/{did}", reader, status=304, headers={"If-None-Match": dep.headers["ETag"]})
    await call("GET", f"/v1/deposits/{uuid.uuid4()}", reader, status=404, params=read)
    await call("GET", f"/v1/reservations/{held['reservation_id']}", reader, status=200, params=read)
    await call("GET", "/v1/stats", reader, status=200, params=read)
    await call("GET", "/v1/projections", admin, status=200)
    await call("GET", w, reader, status=400, params={"min_position": str(2**62)})

    # lists, page by page
    for path, params in (("/v1/wallets", {"owner": owner}), ("/v1/api-keys", {"owner": owner})):
        cursor: str | None = None
        while True:
            page = await call("GET", path, admin, status=200,
                              params={**params, **read, "limit": "1", **({"cursor": cursor} if cursor else {})})
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break

    # audit
    stream = wallet_stream(uuid.UUID(wid))
    await call("GET", "/v1/events", auditor, status=200, params={"cursor": str(payer["position"] - 1), "limit": "5"})
    await call("GET", "/v1/events", auditor, status=400, params={"cursor": "-1"})
    await call("GET", f"/v1/streams/{stream}/events", auditor, status=200, params={"limit": "2"})
    await call("GET", f"/v1/streams/nonesuch-{uuid.uuid4().hex}/events", auditor, status=404)
    await api.request("GET", "/v1/events/export", auditor, status=200,
                      params={"after": str(payer["position"] - 1), "to": str(last)})
    await call("GET", f"{w}/state", auditor, status=200, params={"at_position": str(last)})
    await call("GET", f"{w}/state", auditor, status=400)
    await call("GET", "/v1/audit/verify", auditor, status=200, params={"stream": stream})

    async def folded() -> dict[str, object] | None:  # the folder works in the background: wait for a leaf
        tree: dict[str, object] = await call("GET", "/v1/audit/tree", auditor, status=200)
        return tree if tree["tree_size"] else None

    await eventually(folded, timeout=20, interval=0.05, what="the Merkle tree's first leaf")
    await call("GET", "/v1/audit/proofs/inclusion", auditor, status=200, params={"position": "1"})
    await call("GET", "/v1/audit/proofs/consistency", auditor, status=200, params={"first": "1"})
    await call("GET", "/v1/audit/checkpoints", auditor, status=200)
    await call("GET", "/v1/audit/checkpoints/latest", auditor, status=404)
    await call("GET", "/v1/audit/public-key", auditor, status=404)
    await call("POST", "/v1/audit/checkpoints", auditor, status=403)

    # the stream token, and what it may not do
    token = await call("POST", "/v1/stream-tokens", reader, status=200)
    await call("GET", w, token["token"], status=403)

    # public
    await api.request("GET", "/health/live", status=200)
    await api.request("GET", "/health/ready", status=200)
    await api.request("GET", "/openapi.json", status=200)
    await api.request("GET", "/metrics", status=200)
    for path, *_ in static.FILES:  # the dashboard's and the docs' files are public operations too
        await api.request("GET", path, status=200)

    statuses = {status for _, _, status in api.contract.seen}
    assert statuses >= {200, 201, 204, 304, 400, 401, 403, 404, 409, 412, 415, 422}
    operations = {(method, path) for path, item in api.contract.doc["paths"].items() for method in item}
    streams = {("get", "/v1/streams/events"), ("get", "/v1/streams/dashboard"),
               ("get", "/v1/streams/wallets/{wallet_id}")}
    assert operations - {(method, path) for method, path, _ in api.contract.seen} == streams  # the next test's


@pytest.fixture
async def tight(aiohttp_client: AiohttpClient, database_url: str) -> AsyncIterator[ContractClient]:
    """An app of its own whose keys may make two requests and hold one stream, and whose read models
    stand still (it runs no projections)."""
    app = create_app(make_settings(database_url, rate_limit_per_s=0.001, rate_limit_burst=2,
                                   sse_max_streams_per_key=1, run_projections=False))
    client = await aiohttp_client(app)
    yield ContractClient(client, await served_contract(client))


async def test_rate_limits_and_refused_streams_answer_as_documented(tight: ContractClient) -> None:
    app = tight.client.app
    limited = await mint_token(app, f"limited-{uuid.uuid4().hex[:8]}", ["wallets:read"])
    await tight.request("GET", "/v1/stats", limited, status=200)
    await tight.request("GET", "/v1/stats", limited, status=200)
    answer, _ = await tight.request("GET", "/v1/stats", limited, status=429)
    assert int(answer.headers["Retry-After"]) >= 1

    owner = f"behind-{uuid.uuid4().hex[:8]}"
    writer = await mint_token(app, owner, ["wallets:write", "wallets:read"])
    opened = await tight.json("POST", "/v1/wallets", writer, status=201, json={"owner": owner, "currency": "USD"})
    late, _ = await tight.request("GET", f"/v1/wallets/{opened['wallet_id']}", writer, status=503,
                                  params={"min_position": str(opened["position"])}, headers={"Prefer": "wait=0"})
    assert late.headers["Retry-After"] == "1" and int(late.headers["X-Projection-Position"]) < opened["position"]

    streamer = await mint_token(app, f"streamer-{uuid.uuid4().hex[:8]}", ["wallets:read"])
    holding = await tight.client.get("/v1/streams/events", params={"access_token": streamer})
    try:
        assert holding.status == 200
        tight.contract.check("GET", "/v1/streams/events", holding.status, holding.headers, b"")
        refusal, body = await tight.request("GET", "/v1/streams/events", None, status=200,
                                            params={"access_token": streamer})
        assert refusal.headers["X-Stream-Refused"] == "rate_limited" and b"event: refused" in body
        # the streamer's two requests are spent: a third is rate limited, a stream by a refusal a browser retries
        limited_stream, body = await tight.request("GET", "/v1/streams/dashboard", None, status=200,
                                                   params={"access_token": streamer})
        assert limited_stream.headers["X-Stream-Refused"] == "rate_limited" and b"event: refused" in body
        other = await mint_token(app, f"other-{uuid.uuid4().hex[:8]}", ["wallets:read"])
        await tight.request("GET", f"/v1/streams/wallets/{uuid.uuid4()}", None, status=404,
                            params={"access_token": other})
        await tight.request("GET", "/v1/streams/events", None, status=400, params={"access_token": other, "after": "x"})
        await tight.request("GET", "/v1/streams/events", None, status=401, params={"access_token": "tly_x_y"})
        seen = {(method, path) for method, path, _ in tight.contract.seen}
        assert {("get", "/v1/streams/dashboard"), ("get", "/v1/streams/wallets/{wallet_id}")} <= seen
    finally:
        holding.close()
        await asyncio.sleep(0)


async def test_the_checker_catches_what_the_document_does_not_say(api: ContractClient) -> None:
    """The contract check can fail: an undeclared header, a missing required one, an undocumented
    status, a code outside a status's list, a body off its schema."""
    contract = api.contract
    owner = f"neg-{uuid.uuid4().hex[:8]}"
    admin = await mint_token(api.client.app, owner, ["admin"])
    response, raw = await api.request("POST", "/v1/wallets", admin, status=201,
                                      json={"owner": owner, "currency": "USD"})
    headers = dict(response.headers)
    path = "/v1/wallets"
    with pytest.raises(ContractError, match="x-undeclared"):
        contract.check("POST", path, 201, {**headers, "X-Undeclared": "1"}, raw)
    with pytest.raises(ContractError, match="location"):
        contract.check("POST", path, 201, {k: v for k, v in headers.items() if k != "Location"}, raw)
    with pytest.raises(ContractError, match="status not documented"):
        contract.check("POST", path, 202, headers, raw)
    with pytest.raises(ContractError, match="etag"):
        contract.check("POST", path, 201, {**headers, "ETag": '"1"'}, raw)
    with pytest.raises(ContractError, match="balance"):
        contract.check("POST", path, 201, headers, orjson.dumps({**orjson.loads(raw), "balance": "1"}))
    problem, body = await api.request("POST", path, admin, status=422, json={"owner": owner, "currency": "XXX"})
    wrong = orjson.dumps({**orjson.loads(body), "code": "insufficient_funds"})
    with pytest.raises(ContractError, match="insufficient_funds"):
        contract.check("POST", path, 422, problem.headers, wrong)
