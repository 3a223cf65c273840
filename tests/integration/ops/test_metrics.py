"""GET /metrics speaks the Prometheus text format (parsed by prometheus-client) and counts what happened:
requests by method, route and status, the append batcher, the pool, projections, streams, the process."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from backend.appkeys import POOL
from backend.version import git_commit, version
from projections import registry
from tests.conftest import mint_token
from tests.integration.ops.metrics_scrape import Scrape, scrape
from tests.integration.streaming.conftest import connect
from tests.support import Client, eventually


async def eventually_scraped(client: Client, check: str, timeout: float = 15.0) -> Scrape:
    """Scrape until a sample line matches the regular expression check."""

    async def matching() -> Scrape | None:
        found = await scrape(client)
        return found if re.search(check, found.text, re.MULTILINE) else None

    return await eventually(matching, timeout=timeout, interval=0.05, what=f"a sample matching {check}")


async def test_requests_are_counted_by_method_route_and_status_and_timed_by_status_class(
    client: Client, admin_headers: dict[str, str]
) -> None:
    opened = await client.post("/v1/wallets", json={"owner": "m", "currency": "USD"}, headers=admin_headers)
    assert opened.status == 201
    wallet = (await opened.json())["wallet_id"]
    read = await client.get(f"/v1/wallets/{wallet}", headers=admin_headers)  # 200, or 404 if the model lags
    assert read.status in {200, 404}
    await client.get("/nowhere")
    await client.request("PROPFIND", "/nowhere")  # methods beyond the API's add no series of their own
    found = await scrape(client)
    assert found.types["tally_http_requests"] == "counter"
    assert found.types["tally_http_request_duration_seconds"] == "histogram"
    assert found.value("tally_http_requests_total", method="POST", route="/v1/wallets", status="201") == 1
    assert found.value("tally_http_requests_total", method="GET", route="/v1/wallets/{wallet_id}",
                       status=str(read.status)) == 1
    assert found.value("tally_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert found.value("tally_http_requests_total", method="other", route="unmatched", status="404") == 1
    assert not [labels for labels in found.labels("tally_http_requests_total") if labels["method"] == "PROPFIND"]
    bucket = "tally_http_request_duration_seconds_bucket"
    assert found.value(bucket, method="POST", route="/v1/wallets", status_class="2xx", le="+Inf") == 1
    assert found.value(bucket, method="GET", route="/v1/wallets/{wallet_id}", status_class=f"{read.status // 100}xx",
                       le="+Inf") == 1
    assert found.value("tally_http_request_duration_seconds_count", method="GET", route="unmatched",
                       status_class="4xx") == 1
    assert {"method", "route", "status_class", "le"} == set(found.labels(bucket)[0])


async def test_counters_are_counters_and_every_counter_ends_in_total(
    client: Client, admin_headers: dict[str, str]
) -> None:
    assert (await client.post("/v1/wallets", json={"owner": "t", "currency": "USD"},
                              headers=admin_headers)).status == 201
    found = await scrape(client)
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", found.text, re.MULTILINE))
    assert declared
    for name, kind in declared.items():
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
    for name in ("tally_append_batches_total", "tally_append_requests_total", "tally_command_conflicts_total",
                 "tally_listener_reconnects_total", "tally_api_key_lookups_total",
                 "tally_background_task_restarts_total", "tally_auth_failures_total", "process_cpu_seconds_total"):
        assert declared[name] == "counter", name


async def test_append_batches_are_counted_sized_and_timed(client: Client, admin_headers: dict[str, str]) -> None:
    for owner in ("a", "b"):
        opened = await client.post("/v1/wallets", json={"owner": owner, "currency": "USD"}, headers=admin_headers)
        assert opened.status == 201
    found = await scrape(client)
    assert found.value("tally_event_store_head") >= 2
    batches = found.value("tally_append_batches_total")
    assert batches >= 2
    assert found.types["tally_append_batch_duration_seconds"] == "histogram"
    assert found.value("tally_append_batch_duration_seconds_count") == batches  # every committed batch is timed
    assert found.value("tally_append_batch_duration_seconds_bucket", le="+Inf") == batches
    assert found.value("tally_append_batch_size_count") == batches
    assert found.value("tally_append_batch_size_sum") == found.value("tally_append_requests_total")


async def test_pool_process_and_build(client: Client) -> None:
    found = await scrape(client)
    assert found.value("tally_db_pool_max_size") >= 1
    assert 1 <= found.value("tally_db_pool_size") <= found.value("tally_db_pool_max_size")
    assert 0 <= found.value("tally_db_pool_in_use") <= found.value("tally_db_pool_size")
    assert found.value("tally_db_pool_waiting") == 0
    assert found.value("process_resident_memory_bytes") > 0
    assert found.value("process_open_fds") > 0
    assert found.value("process_cpu_seconds_total") > 0
    assert found.value("tally_build_info", version=version(), commit=git_commit() or "") == 1
    assert found.value("tally_event_loop_info") == 1


async def test_each_projection_reports_its_lag_and_state(client: Client, admin_headers: dict[str, str]) -> None:
    assert (await client.post("/v1/wallets", json={"owner": "p", "currency": "USD"},
                              headers=admin_headers)).status == 201
    found = await eventually_scraped(client, r'^tally_projection_lag_events\{projection="balances"\} 0\.0$')
    assert found.value("tally_projection_status_up") == 1
    for name in registry.names():
        assert found.value("tally_projection_lag_seconds", projection=name) >= 0
        states = {labels["state"]: found.value("tally_projection_state", **labels)
                  for labels in found.labels("tally_projection_state") if labels["projection"] == name}
        assert set(states) == {"running", "stopped", "failed"}
        assert sum(states.values()) == 1
    assert found.value("tally_projection_state", projection="balances", state="running") == 1


async def test_stream_subscribers_are_counted_by_kind(client: Client) -> None:
    token = await mint_token(client.app, "auditor", ["audit:read"])
    found = await scrape(client)
    assert found.value("tally_stream_subscribers", kind="log") == 0
    stream = await connect(client, "/v1/streams/events", token, after="now")
    assert stream.status == 200
    assert (await stream.next()).kind == "checkpoint"
    found = await scrape(client)
    assert found.value("tally_stream_subscribers", kind="log") == 1
    assert found.value("tally_stream_subscribers", kind="dashboard") == 0
    stream.close()
    await eventually_scraped(client, r'^tally_stream_subscribers\{kind="log"\} 0\.0$')


async def test_pool_saturation_shows_as_in_use_and_waiting(client: Client) -> None:
    """Every connection held, one more acquire waits: the scrape still answers (its projection status
    read times out, and says so) and shows the pool full with waiters."""
    pool = client.app[POOL]
    held: list[Any] = []

    async def take() -> Any:
        return await pool.acquire()

    waiting: asyncio.Task[Any] | None = None
    try:
        with contextlib.suppress(TimeoutError):
            while len(held) < pool.get_max_size():  # whatever the app's own tasks do not hold at the moment
                async with asyncio.timeout(0.5):
                    held.append(await take())
        waiting = asyncio.create_task(take())
        await asyncio.sleep(0.05)
        found = await scrape(client)
        assert found.value("tally_db_pool_in_use") == found.value("tally_db_pool_max_size")
        assert found.value("tally_db_pool_waiting") >= 1
        assert found.value("tally_projection_status_up") == 0
        assert not found.labels("tally_projection_lag_events")
    finally:
        for conn in held:
            await pool.release(conn)
        if waiting is not None:
            await pool.release(await waiting)
    found = await scrape(client)
    assert found.value("tally_db_pool_waiting") == 0
    assert found.value("tally_projection_status_up") == 1
