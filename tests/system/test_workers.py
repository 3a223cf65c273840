"""Several server processes on one database: correctness never depends on which process a request
reaches. Two single-worker `serve` processes on two ports give a deterministic alternation (each
worker of `serve --workers N` is the same code path); `serve --workers 2` itself is checked for its
parent: it restarts a killed worker, and SIGTERM under load drops nothing and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import ROOT
from tests.support import eventually_blocking
from tests.system.serving import (
    Server,
    answers_ready,
    children,
    create_key,
    serving,
    serving_workers,
    started,
    wait_for_workers,
)

pytestmark = pytest.mark.system

RACERS = 100
BALANCE = 1000
AMOUNT = 30


async def call(session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
               ) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, json=body) as reply:
        return reply.status, await reply.json(content_type=None)


async def wallet_events(database_url: str, wallet_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select version, type, data from events where stream_id = $1 order by version",
                                f"wallet-{wallet_id}")
    finally:
        await conn.close()
    return [(row["version"], row["type"], json.loads(row["data"]) if isinstance(row["data"], str) else row["data"])
            for row in rows]


def test_one_wallet_across_two_processes(fresh_database_url: str) -> None:
    token = create_key(fresh_database_url)
    with serving(fresh_database_url) as a, serving(fresh_database_url) as b:
        asyncio.run(alternate(fresh_database_url, token, a.base, b.base))


async def alternate(database_url: str, token: str, a: str, b: str,
                    on: Callable[[int], aiohttp.ClientSession] | None = None) -> None:
    """Request n goes to `a` when n is even, else to `b`; `on(n)`, when given, is the session that
    carries it (one that reaches the wanted worker of `serve --workers 2`, a and b then being one URL)."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as shared:
        def to(n: int, method: str, path: str, body: dict[str, Any] | None = None
               ) -> Coroutine[Any, Any, tuple[int, dict[str, Any]]]:
            return call(on(n) if on is not None else shared, method, f"{(a, b)[n % 2]}{path}", body)

        # Credits and debits alternate between the processes: each succeeds on the version the other made.
        status, wallet = await to(0, "POST", "/v1/wallets", {"owner": "alice", "currency": "USD"})
        assert status == 201, wallet
        wid = wallet["wallet_id"]
        balance = 0
        for n in range(20):
            kind, delta = ("credits", 7) if n % 3 else ("debits", -3)
            if balance + delta < 0:
                kind, delta = "credits", 7
            status, body = await to(n, "POST", f"/v1/wallets/{wid}/{kind}",
                                    {"amount": abs(delta), "reference": f"alt-{n}"})
            balance += delta
            assert (status, body["balance"], body["version"]) == (200, balance, n + 2), (n, body)

        # The 100-way debit race on one wallet, half through each process.
        status, racer = await to(1, "POST", "/v1/wallets", {"owner": "bob", "currency": "USD"})
        rid = racer["wallet_id"]
        status, _ = await to(0, "POST", f"/v1/wallets/{rid}/credits", {"amount": BALANCE, "reference": "seed"})
        assert status == 200
        answers = await asyncio.gather(*(
            to(n, "POST", f"/v1/wallets/{rid}/debits", {"amount": AMOUNT, "reference": f"r{n}"})
            for n in range(RACERS)))
        outcomes = Counter((status, body.get("code")) for status, body in answers)
        won = BALANCE // AMOUNT
        assert outcomes == {(200, None): won, (422, "insufficient_funds"): RACERS - won}, outcomes
        last = max(body["position"] for status, body in answers if status == 200)
        for n in (0, 1):  # reads are of the read model: min_position asks for the writes made so far
            status, read = await to(n, "GET", f"/v1/wallets/{rid}?min_position={last}")
            assert (status, read["balance"]) == (200, BALANCE - won * AMOUNT)
        events = await wallet_events(database_url, rid)
        assert [version for version, _, _ in events] == list(range(1, len(events) + 1))
        running = 0
        for _, kind, data in events:
            sign = 1 if kind.endswith("Credited") else -1 if kind.endswith("Debited") else 0
            running += sign * data.get("amount", 0)
            assert running >= 0
        assert sum(kind.endswith("Debited") for _, kind, _ in events) == won
        assert running == BALANCE - won * AMOUNT

        # A settle between wallets last touched by different processes.
        _, payer = await to(0, "POST", "/v1/wallets", {"owner": "carol", "currency": "USD"})
        _, payee = await to(1, "POST", "/v1/wallets", {"owner": "dave", "currency": "USD"})
        pid, qid = payer["wallet_id"], payee["wallet_id"]
        status, _ = await to(0, "POST", f"/v1/wallets/{pid}/credits", {"amount": 50, "reference": "p"})
        assert status == 200
        status, _ = await to(1, "POST", f"/v1/wallets/{qid}/credits", {"amount": 5, "reference": "q"})
        assert status == 200
        status, lock = await to(1, "POST", f"/v1/wallets/{pid}/locks", {"amount": 20, "reason": "pay"})
        assert status == 201, lock
        status, settled = await to(0, "POST", f"/v1/wallets/{pid}/locks/{lock['lock_id']}/settle",
                                   {"to_wallet_id": qid})
        assert (status, settled["balance"]) == (200, 30), settled
        after = settled["position"]
        status, read = await to(1, "GET", f"/v1/wallets/{qid}?min_position={after}")
        assert (status, read["balance"]) == (200, 25), read
        status, read = await to(1, "GET", f"/v1/wallets/{pid}?min_position={after}")
        assert (status, read["balance"], read["locked"]) == (200, 30, 0), read
        # And the payee, last written by the settle on `a`, takes a debit on `b` and one on `a`.
        status, body = await to(1, "POST", f"/v1/wallets/{qid}/debits", {"amount": 4, "reference": "q1"})
        assert (status, body["balance"]) == (200, 21), body
        status, body = await to(0, "POST", f"/v1/wallets/{qid}/debits", {"amount": 21, "reference": "q2"})
        assert (status, body["balance"]) == (200, 0), body


def test_workers_parent_restarts_and_drains(fresh_database_url: str) -> None:
    token = create_key(fresh_database_url)
    with serving_workers(fresh_database_url) as server:
        proc = server.proc
        first = children(proc.pid)
        # One leader per projection and one Merkle folder across both workers (advisory locks).
        with urllib.request.urlopen(f"{server.base}/health/ready", timeout=5) as reply:
            projections = json.loads(reply.read())["checks"]["projections"]
        eventually_blocking(lambda: server.logs().count("projection runner leads") >= len(projections) > 0
                            and "merkle folder leading" in server.logs(), what="projections led")
        time.sleep(1.0)  # time for a second leader, were there one, to say so
        logs = server.logs()
        assert logs.count("projection runner leads") == len(projections), logs
        assert logs.count("merkle folder leading") == 1, logs
        # SIGHUP ("reload", to an init script) or SIGUSR1 ended the parent, and every worker with it
        for pid, signum in ((proc.pid, signal.SIGHUP), (proc.pid, signal.SIGUSR1), (first[1], signal.SIGHUP)):
            os.kill(pid, signum)
        eventually_blocking(lambda: server.logs().count("signal ignored") >= 3, what="the stray signals logged")
        assert proc.poll() is None and children(proc.pid) == first and answers_ready(server.base)
        os.kill(first[0], signal.SIGKILL)
        eventually_blocking(lambda: len(children(proc.pid)) == 2 and first[0] not in children(proc.pid),
                            what=lambda: "the killed worker restarted: " + server.logs())
        assert first[1] in children(proc.pid)
        eventually_blocking(lambda: "worker exited; restarting it" in server.logs(), what="restart logged")
        eventually_blocking(lambda: server.logs().count("listening on") >= 3,
                            what=lambda: "the new worker listening: " + server.logs())
        assert answers_ready(server.base)
        outcomes = asyncio.run(load_then_sigterm(server, token, fresh_database_url))
        assert proc.wait(timeout=40) == 0, server.logs()
        assert outcomes["dropped"] == 0, outcomes
        assert outcomes["answered 200"] > 0 and outcomes["refused"] > 0, outcomes


async def load_then_sigterm(server: Server, token: str, database_url: str) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        status, wallet = await call(session, "POST", f"{server.base}/v1/wallets", {"owner": "eve", "currency": "USD"})
        assert status == 201
        url = f"{server.base}/v1/wallets/{wallet['wallet_id']}/credits"
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=1)) as session:
            while True:
                reference = f"{n}-{uuid.uuid4()}"
                try:
                    async with session.post(url, json={"amount": 1, "reference": reference}) as reply:
                        await reply.read()
                        outcomes[f"answered {reply.status}"] += 1
                except aiohttp.ClientConnectorError as exc:
                    if exc.os_error.errno == errno.ECONNREFUSED:
                        outcomes["refused"] += 1
                        return
                    unanswered.append(reference)
                    return
                except aiohttp.ClientError:
                    unanswered.append(reference)
                    return
                if stop.is_set() and outcomes["answered 200"] > 0 and time.monotonic() > stopped_at + 30:
                    return

    unanswered: list[str] = []
    stopped_at = time.monotonic() + 1e9
    clients = [asyncio.create_task(client(n)) for n in range(8)]
    await asyncio.sleep(1.0)
    stopped_at = time.monotonic()
    stop.set()
    server.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
    await asyncio.to_thread(server.proc.wait, timeout=40)
    applied = {data["reference"] for _, kind, data in await wallet_events(database_url, wallet["wallet_id"])
               if kind == "WalletCredited"}
    for reference in unanswered:
        # A connection the kernel completed in the instant between a worker's last accept and the close of
        # its listening socket is reset unread (the kernel's doing: the request never reached the process,
        # as if refused). One the server read and then left without an answer is what the drain must prevent.
        outcomes["dropped" if reference in applied else "reset unread"] += 1
    return outcomes


@pytest.mark.timeout(300)
def test_workers_share_one_embedded_postgres(tmp_path: Path) -> None:
    """DATABASE_URL unset: the parent starts the embedded server once, both workers use it, and it is
    stopped when the parent exits."""
    with started(None, DATA_DIR=str(tmp_path / "data"), WORKERS="2", LOG_FORMAT="text") as server:
        wait_for_workers(server, 2, timeout=240)
        assert server.proc.poll() is None, server.logs()
        assert answers_ready(server.base)
        assert server.logs().count("embedded PostgreSQL ready") == 1, server.logs()
        assert len(children(server.proc.pid)) == 2
        assert (tmp_path / "data" / "pg" / "postmaster.pid").exists()
        assert server.stop(timeout=60) == 0, server.logs()
        assert not (tmp_path / "data" / "pg" / "postmaster.pid").exists(), server.logs()


def test_workers_drain_when_the_parent_is_killed(fresh_database_url: str) -> None:
    """kill -9 of the parent forwards nothing: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG),
    so no worker is left serving without a parent."""
    workers: list[int] = []
    with started(fresh_database_url, "--workers", "2", LOG_FORMAT="text") as server:
        try:
            wait_for_workers(server, 2)
            workers = children(server.proc.pid)
            assert len(workers) == 2
            server.proc.kill()
            server.proc.wait()
            eventually_blocking(
                lambda: not any(Path(f"/proc/{pid}").exists() and "Z" not in stat(pid) for pid in workers),
                what="the workers stopped")
            assert server.logs().count("shutting down: draining requests") == 2, server.logs()
            assert not answers_ready(server.base)
        finally:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "Z"


def test_workers_settings_are_checked(fresh_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_database_url}
    zero = subprocess.run([sys.executable, "-m", "backend", "serve", "--workers", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert zero.returncode == 2 and "WORKERS" in zero.stderr.upper(), zero.stderr
    any_port = subprocess.run([sys.executable, "-m", "backend", "serve", "--workers", "2", "--port", "0"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
    assert any_port.returncode == 2 and "needs a fixed PORT" in any_port.stderr, any_port.stderr
