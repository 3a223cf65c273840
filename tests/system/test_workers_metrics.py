"""`serve --workers N` and Prometheus: on the shared port each scrape reaches whichever worker the
kernel picks, so one target's counters would jump between workers' values (and read as resets);
METRICS_PORT gives each worker a port of its own (METRICS_PORT + its index) for /metrics and /health/*."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from tests.system.serving import free_port, serving_workers

pytestmark = pytest.mark.system

SCRAPES = re.compile(r'^tally_http_requests_total\{method="GET",route="/metrics",status="200"\} (\S+)$', re.M)


def scrape(port: int, path: str = "/metrics") -> tuple[str | None, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return reply.headers.get("X-Tally-Worker"), reply.read().decode()


def scrapes_counted(text: str) -> float:
    found = SCRAPES.search(text)
    return float(found[1]) if found else 0.0


def test_each_worker_serves_its_own_metrics_on_its_own_port(fresh_database_url: str) -> None:
    base = min(free_port(), 65534)
    with serving_workers(fresh_database_url, METRICS_PORT=str(base)) as server:
        for index in range(2):
            seen = []
            for _ in range(5):
                worker, text = scrape(base + index)
                assert worker == str(index)
                assert text.startswith("# HELP") and "tally_build_info" in text
                seen.append(scrapes_counted(text))
            assert seen == sorted(seen) and seen[-1] > seen[0], seen  # one worker's counter: never back
            worker, text = scrape(base + index, "/health/ready")
            assert worker == str(index) and '"status": "ready"' in text
        with pytest.raises(urllib.error.HTTPError) as refused:  # the API stays on the shared port
            scrape(base, "/v1/wallets")
        assert refused.value.code == 404
        assert server.logs().count("serving metrics on http://127.0.0.1:") == 2, server.logs()


def test_sigterm_logs_one_drain_per_worker_with_a_metrics_port(fresh_database_url: str) -> None:
    """Each worker drains its API site and its metrics site; the process announces its drain once."""
    base = min(free_port(), 65534)
    with serving_workers(fresh_database_url, METRICS_PORT=str(base)) as server:
        assert server.stop(timeout=60) == 0, server.logs()
        drains = [line for line in server.logs().splitlines() if "shutting down: draining requests" in line]
        assert len(drains) == 2, "\n".join(drains)
