"""No HTTP cache keeps a copy of what an API key reads or is given (a new key's secret, balances, the
log), and no browser reads an answer as anything but its declared type: every answer of the API carries
Cache-Control: no-store and X-Content-Type-Options: nosniff, errors included; answers that say
otherwise (the static pages, the streams) keep their own Cache-Control."""

from __future__ import annotations

from typing import Any

from tests.conftest import bearer
from tests.support import Client

NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def assert_not_stored(response: Any) -> None:
    got = {name: response.headers.get(name) for name in NO_STORE}
    assert got == NO_STORE, (response.method, response.url.path, response.status, got)


async def test_every_api_answer_is_no_store_and_nosniff(client: Client, admin_headers: dict[str, str]) -> None:
    created_key = await client.post("/v1/api-keys", headers=admin_headers,
                                    json={"owner": "cache", "name": "cache", "scopes": ["wallets:read"]})
    assert created_key.status == 201 and "secret" in await created_key.json()
    assert_not_stored(created_key)

    wallet = await client.post("/v1/wallets", headers=admin_headers, json={"owner": "cache", "currency": "USD"})
    assert wallet.status == 201
    assert_not_stored(wallet)
    wallet_id = (await wallet.json())["wallet_id"]
    position = wallet.headers["X-Position"]
    read = await client.get(f"/v1/wallets/{wallet_id}", headers={**admin_headers, "X-Min-Position": position})
    assert read.status == 200
    assert_not_stored(read)
    unchanged = await client.get(f"/v1/wallets/{wallet_id}",
                                 headers={**admin_headers, "If-None-Match": read.headers["ETag"]})
    assert unchanged.status == 304
    assert_not_stored(unchanged)
    export = await client.get("/v1/events/export", headers=admin_headers)
    assert export.status == 200
    await export.read()
    assert_not_stored(export)

    for response in (
        await client.get("/v1/wallets/not-a-uuid", headers=admin_headers),  # 404
        await client.get(f"/v1/wallets/{wallet_id}"),  # 401, no key
        await client.get(f"/v1/wallets/{wallet_id}", headers=bearer("tly_" + "0" * 32 + "_unknown")),  # 401
        await client.get("/nowhere"),
        await client.get("/health/live"),
    ):
        assert response.status in (200, 401, 404), response.status
        assert_not_stored(response)


async def test_pages_and_streams_keep_their_own_cache_control(client: Client, admin_headers: dict[str, str]) -> None:
    page = await client.get("/dashboard")
    assert (page.headers["Cache-Control"], page.headers["X-Content-Type-Options"]) == ("no-cache", "nosniff")
    async with client.get("/v1/streams/events", headers=admin_headers) as stream:
        assert stream.status == 200
        assert stream.headers["Cache-Control"] == "no-cache"
