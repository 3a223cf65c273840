"""Real processes: startup failure, waiting for the database, concurrent migrations, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from backend.audit.signing import keygen
from backend.store.append import APPEND_LOCK_KEY
from backend.store.migrate import available_migrations
from tests.conftest import ROOT
from tests.support import advisory_lock_waiters, eventually, eventually_blocking, query_blocking
from tests.system.serving import answers_ready

pytestmark = pytest.mark.system


def run_backend(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNREACHABLE = f"postgresql://tally:s3cret-pw@127.0.0.1:{free_port()}/tally"


def test_unreachable_database_fails_fast_with_one_masked_line() -> None:
    started = time.monotonic()
    result = run_backend("serve", env={"DATABASE_URL": UNREACHABLE, "PORT": str(free_port())})
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tally:")]
    assert len(error_lines) == 1, result.stderr
    assert "cannot connect to database" in error_lines[0]
    assert "s3cret-pw" not in result.stderr
    assert "tally:***@127.0.0.1" in error_lines[0]


def test_wait_for_db_retries_with_backoff_then_gives_up() -> None:
    started = time.monotonic()
    result = run_backend("serve", "--wait-for-db", "2", env={"DATABASE_URL": UNREACHABLE, "LOG_FORMAT": "text"})
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert elapsed >= 2
    assert result.stderr.count("database not reachable, retrying") >= 2
    assert "s3cret-pw" not in result.stderr


def test_a_port_in_use_fails_with_one_line(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_backend("serve", env={"DATABASE_URL": database_url, "PORT": str(port)})
    assert result.returncode == 1, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tally:")]
    assert error_lines == [f"tally: error: cannot listen on 127.0.0.1 port {port}: Address already in use"], \
        result.stderr
    assert "Traceback" not in result.stderr
    nowhere = run_backend("serve", env={"DATABASE_URL": database_url, "HOST": "nowhere.invalid", "PORT": str(port)})
    assert nowhere.returncode == 1 and "Traceback" not in nowhere.stderr, nowhere.stderr  # was a socket.gaierror
    [line] = [line for line in nowhere.stderr.splitlines() if line.startswith("tally:")]
    assert line.startswith(f"tally: error: cannot listen on nowhere.invalid port {port}: "), nowhere.stderr


def test_bad_setting_fails_naming_the_variable() -> None:
    result = run_backend("serve", env={"PORT": "not-a-port"})
    assert result.returncode == 2
    assert "PORT" in result.stderr


def test_two_concurrent_migrators_apply_each_migration_once(fresh_database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_database_url}
    procs = [
        subprocess.Popen([sys.executable, "-m", "backend", "migrate"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert sum("applied" in out for out, _ in outputs) == 1, outputs

    versions = query_blocking(fresh_database_url, "select version from schema_migrations order by 1")
    assert [r["version"] for r in versions] == [m.version for m in available_migrations()]


@pytest.mark.parametrize(("choice", "loop"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_sigterm_drains_and_exits_zero(database_url: str, choice: str, loop: str) -> None:
    """On either event loop (the test extra installs uvloop, so EVENT_LOOP=auto takes it)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), "LOG_FORMAT": "json", "EVENT_LOOP": choice}
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert f'tally_event_loop_info{{loop="{loop}"}} 1' in reply.read().decode()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        listening = [json.loads(line) for line in stderr.splitlines() if "listening on" in line]
        assert [(entry["url"], entry["event_loop"]) for entry in listening] == [(f"http://127.0.0.1:{port}", loop)]
        assert "stopped" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_lets_an_in_flight_command_finish(database_url: str) -> None:
    """A debit stuck behind the append lock when SIGTERM arrives still completes and is answered."""
    created = run_backend("keys", "create", "--owner", "operator", "--scopes", "admin",
                          env={"DATABASE_URL": database_url})
    assert created.returncode == 0, created.stderr
    token = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("token:"))
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "PORT": str(port), "LOG_FORMAT": "text"}
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_ready(base, proc)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        wallet = post_json(f"{base}/v1/wallets", {"owner": "drain", "currency": "USD"}, headers)
        wallet_id = wallet["wallet_id"]
        post_json(f"{base}/v1/wallets/{wallet_id}/credits", {"amount": 10, "reference": "seed"}, headers)

        async def scenario() -> tuple[int, dict[str, object]]:
            blocker = await asyncpg.connect(database_url)
            try:
                await blocker.execute("select pg_advisory_lock($1)", APPEND_LOCK_KEY)
                request = asyncio.create_task(asyncio.to_thread(
                    post_json_status, f"{base}/v1/wallets/{wallet_id}/debits", {"amount": 3, "reference": "d"},
                    headers))
                await eventually(lambda: advisory_lock_waiters(blocker), timeout=10,
                                 what="the server's append to wait for the lock")
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)  # the server is now draining; the debit is still waiting
                assert proc.poll() is None
                await blocker.execute("select pg_advisory_unlock($1)", APPEND_LOCK_KEY)
                return await request
            finally:
                await blocker.close()

        status, body = asyncio.run(scenario())
        assert status == 200, body
        assert body["balance"] == 7
        _, stderr = proc.communicate(timeout=30)  # communicate drains the pipes the server logs into
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_until_ready(base: str, proc: subprocess.Popen[str]) -> None:
    def ready() -> bool:
        up = answers_ready(base)
        assert proc.poll() is None, proc.communicate()
        return up

    eventually_blocking(ready, what="server ready")


def post_json_status(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post_json(url: str, body: dict[str, object], headers: dict[str, str]) -> dict[str, object]:
    status, answer = post_json_status(url, body, headers)
    assert status in (200, 201), answer
    return answer


@pytest.mark.parametrize("module", ["backend", "projections"])
def test_a_login_the_database_refuses_is_one_masked_line(database_url: str, module: str) -> None:
    """A password the server rejects (or a role it does not know, or may not log in) used to end serve
    and the projections worker in a traceback; it is one line naming the refusal, the password masked."""
    parts = urlsplit(database_url)
    refused = urlunsplit((parts.scheme, f"tally_nobody:s3cret-pw@{parts.netloc.rpartition('@')[2]}", parts.path,
                          parts.query, ""))
    args = [sys.executable, "-m", module, *(["serve"] if module == "backend" else [])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DATABASE_URL": refused, "PORT": str(free_port()), "LOG_FORMAT": "text"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith(("tally:", "projections:"))]
    assert "cannot connect to database" in line and "tally_nobody:***@" in line, line
    assert 'role "tally_nobody" does not exist' in line, line
    assert "s3cret-pw" not in result.stderr


@pytest.mark.parametrize("module", ["backend", "projections"])
def test_without_apply_migrations_an_unmigrated_database_is_one_line(fresh_database_url: str, module: str) -> None:
    """serve and the projections worker used to wait 10 s for their listener, then die in a TimeoutError."""
    args = [sys.executable, "-m", module, *(["serve"] if module == "backend" else [])]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DATABASE_URL": fresh_database_url, "APPLY_MIGRATIONS": "false",
                                 "PORT": str(free_port()), "LOG_FORMAT": "text"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith(("tally:", "projections:"))]
    assert "is not migrated" in line and "run `python -m backend migrate` first" in line, line


@pytest.mark.parametrize("module", ["backend", "projections"])
def test_a_direct_database_url_leading_elsewhere_is_refused_before_anything_changes(
        database_url: str, fresh_database_url: str, module: str) -> None:
    """DIRECT_DATABASE_URL naming another database than DATABASE_URL (a pooler's alias pointed at the
    wrong one, a copy-pasted staging URL) used to start: migrations, the leaders and LISTEN on the one,
    commands on the other, so the read models never saw an event and every read with min_position 503'd."""
    args = ("serve",) if module == "backend" else ()
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "DATABASE_URL": database_url, "PORT": str(free_port()),
                                             "DIRECT_DATABASE_URL": fresh_database_url, "LOG_FORMAT": "json"})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and "DIRECT_DATABASE_URL" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert query_blocking(fresh_database_url, "select count(*) from pg_tables where schemaname = 'public'")[0][0] == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signing_key_others_can_read_is_refused_before_anything_changes(
        fresh_database_url: str, tmp_path: Path, workers: str) -> None:
    """AUDIT_SIGNING_KEY_FILE at mode 0644 used to be loaded and signed with: now serve, and the parent of
    --workers N (whose workers would each be refused and restarted forever), stop with one line naming the
    setting, the mode and `chmod 600`, before the database is touched."""
    key = tmp_path / "signing.pem"
    keygen(key)
    key.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "backend", "serve"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "DATABASE_URL": fresh_database_url, "WORKERS": workers,
                                             "PORT": str(free_port()), "AUDIT_SIGNING_KEY_FILE": str(key),
                                             "LOG_FORMAT": "json"})
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert errors == [f"tally: error: AUDIT_SIGNING_KEY_FILE: {key} is open to group or others (mode 0644): "
                      f"a private key must be its owner's alone; run chmod 600 {key}"], result.stderr
    assert query_blocking(fresh_database_url, "select count(*) from pg_tables where schemaname = 'public'")[0][0] == 0
