"""A real server whose LISTEN connection died of an error the old listener did not expect keeps
serving, reports the restart, and still exits 0 on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT
from tests.support import eventually_blocking
from tests.system.test_lifecycle import free_port, wait_until_ready

pytestmark = pytest.mark.system

# The server, with asyncpg's fetchval made to raise InternalClientError (what a server restart left
# behind in the field) once on the LISTEN connection, after it has started listening.
SERVE_WITH_A_BROKEN_LISTENER = """
import sys
import asyncpg
from asyncpg import exceptions
from backend.store.append import NOTIFY_CHANNEL

original = asyncpg.Connection.fetchval
calls = []

async def fetchval(self, *args, **kwargs):
    if NOTIFY_CHANNEL in self._listeners:
        calls.append(1)
        if len(calls) == 3:
            raise exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    return await original(self, *args, **kwargs)

asyncpg.Connection.fetchval = fetchval
from backend.__main__ import main
sys.exit(main(["serve"]))
"""


def scrape(base: str, proc: subprocess.Popen[str]) -> str:
    """The server's metrics; a server that died meanwhile fails the test with its output."""
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            return str(reply.read().decode())
    except OSError:
        assert proc.poll() is None, proc.communicate()
        raise


def test_sigterm_exits_zero_after_the_listener_task_failed(database_url: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), "LOG_FORMAT": "json",
           "LISTENER_POLL_S": "0.1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_A_BROKEN_LISTENER], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(base, proc)
        # The restart is counted when the new run starts, the reconnect once its connection is up.
        restarted = re.compile(r'tally_background_task_restarts_total\{task="listener"\} 1\b')
        seen = [""]

        def recovered() -> bool:
            seen[0] = metrics = scrape(base, proc)  # a server that died fails the test with its output
            return bool(restarted.search(metrics) and re.search(r"tally_listener_reconnects_total 1\b", metrics))

        eventually_blocking(recovered, what=lambda: "a restart and a reconnect in the metrics:\n" + seen[0])
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        failed = [line for line in lines if line["msg"] == "background task failed, restarting it"]
        assert [(f["level"], f["task"]) for f in failed] == [("WARNING", "listener")], stderr
        assert failed[0]["reason"].startswith("InternalClientError: cannot switch to state 15")
        assert not [line for line in lines if line["level"] == "ERROR"], stderr
    finally:
        if proc.poll() is None:
            proc.kill()
