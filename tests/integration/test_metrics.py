"""GET /metrics speaks the Prometheus text format and counts what happened."""

from __future__ import annotations

from aiohttp.test_utils import TestClient


async def test_metrics_count_requests_by_route_and_expose_store_gauges(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    opened = await client.post("/v1/wallets", json={"owner": "m", "currency": "USD"}, headers=admin_headers)
    assert opened.status == 201
    await client.get("/nowhere")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    text = await response.text()
    assert 'tally_http_requests_total{method="POST",route="/v1/wallets",status="201"} 1' in text
    assert 'route="unmatched",status="404"' in text
    assert 'tally_http_request_duration_seconds_bucket{route="/v1/wallets",le="+Inf"} 1' in text
    head = next(line for line in text.splitlines() if line.startswith("tally_event_store_head "))
    assert int(float(head.split()[1])) >= 1
    assert "tally_append_batches_total" in text
    assert "# TYPE tally_append_batch_duration_seconds histogram" in text
    batches = int(float(next(line for line in text.splitlines()
                             if line.startswith("tally_append_batches_total ")).split()[1]))
    timed = next(line for line in text.splitlines() if line.startswith("tally_append_batch_duration_seconds_count"))
    assert int(timed.split()[1]) == batches >= 1  # every committed batch is timed
    assert f'tally_append_batch_duration_seconds_bucket{{le="+Inf"}} {batches}' in text
