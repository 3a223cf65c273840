"""`python -m projections --port P` serves /metrics and /health/* of its own: its runners' lag and state,
its pool, its restarts and its process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from projections import registry
from tests.conftest import ROOT
from tests.system.procs import Process, free_port

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status, reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_worker_serves_metrics_and_health_on_its_port(own_database_url: str) -> None:
    port = free_port()
    worker = Process("worker", ["-m", "projections", "--port", str(port)],
                     {"DATABASE_URL": own_database_url, "LOG_FORMAT": "text"}, port=port).start()
    try:
        worker.wait_ready()
        assert get(f"{worker.base}/health/live") == (200, '{"status": "live"}')
        status, body = get(f"{worker.base}/health/ready")
        assert status == 200
        assert {f"projection-{name}" for name in registry.names()} <= set(json.loads(body)["tasks"])
        deadline = time.monotonic() + 30
        while True:  # each runner takes its leader lock soon after the start
            status, text = get(f"{worker.base}/metrics")
            assert status == 200
            found = samples(text)
            running = [name for name in registry.names()
                       if found.get(("tally_projection_state", (("projection", name), ("state", "running")))) == 1]
            if len(running) == len(registry.names()):
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert found[("tally_projection_status_up", ())] == 1
        for name in registry.names():
            assert found[("tally_projection_lag_events", (("projection", name),))] >= 0
            assert found[("tally_background_task_restarts_total", (("task", f"projection-{name}"),))] == 0
        assert found[("tally_db_pool_max_size", ())] >= 1
        assert found[("process_resident_memory_bytes", ())] > 0
        assert ("tally_listener_reconnects_total", ()) in found
        assert ("tally_append_batches_total", ()) in found
        assert [key for key in found if key[0] == "tally_build_info"]
        ready = ("tally_http_requests_total", (("method", "GET"), ("route", "/health/ready"), ("status", "200")))
        assert found[ready] >= 2  # wait_ready's, and this test's
        # serve's protocol: what the parser refuses is problem+json that quotes nothing, and no traceback
        for hostile in (b"GET /metrics HTTP/1.1\r\nHost: w\r\nX-A: a\x01<script>\r\n\r\n",
                        b"GET /metrics HTTP/1.1\r\nHost: w\r\nExpect: 999-<script>\r\nConnection: close\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(hostile)
                answer = sock.recv(65536)
            assert b"application/problem+json" in answer and b"<script>" not in answer, answer
    finally:
        assert worker.stop() == 0, worker.output()
    assert "Traceback" not in worker.output()


def test_a_bad_port_is_refused_at_once() -> None:
    refused = subprocess.run([sys.executable, "-m", "projections", "--port", "70000"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "not a port number: '70000'" in refused.stderr


def test_a_port_in_use_fails_with_one_line_before_any_work(own_database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run([sys.executable, "-m", "projections", "--port", str(port)], cwd=ROOT,
                                 env={**os.environ, "DATABASE_URL": own_database_url, "LOG_FORMAT": "text"},
                                 capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert f"projections: error: cannot serve metrics: cannot listen on 127.0.0.1 port {port}: " in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "projection worker running" not in refused.stderr
