"""Real processes: `python -m projections` workers failing over after kill -9, and the
`python -m backend projections status | rebuild` commands, also when a rebuild's sessions are lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from projections import checkpoints, registry
from projections.status import status
from tests.conftest import ROOT
from tests.integration.projections.harness import Node
from tests.integration.projections.workload import Workload
from tests.support import eventually

pytestmark = pytest.mark.system


def env_for(dsn: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": dsn, "LOG_FORMAT": "text", "PROJECTION_STANDBY_RETRY_S": "1"}


def backend(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", "projections", *args], cwd=ROOT, env=env_for(dsn),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def workers(own_database_url: str) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def start_rebuild(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "backend", "projections", "rebuild", *args], cwd=ROOT,
                            env=env_for(dsn), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def killed_on_failure(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The process, killed and reaped if the block fails, so that a failing test leaves no rebuild behind."""
    try:
        yield process
    except BaseException:
        process.kill()
        process.communicate()
        raise


REBUILD_SCHEMAS_SQL = "select array_agg(nspname order by nspname) from pg_namespace " \
                      "where starts_with(nspname, 'tally_rebuild_')"


def start_worker(dsn: str, workers: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-m", "projections"], cwd=ROOT, env=env_for(dsn),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers.append(process)
    return process


async def test_a_killed_worker_is_replaced_within_five_seconds(
    own_database_url: str, workers: list[subprocess.Popen[str]]
) -> None:
    node = await Node.open(own_database_url)
    names = registry.names()
    try:
        first = start_worker(own_database_url, workers)

        async def led_by(pid: int) -> bool:
            found = await status(node.pool, names)
            return all(s.state == "running" and (s.leader or "").endswith(f"-{pid}") for s in found)

        await eventually(lambda: led_by(first.pid), timeout=30, what="the first worker to lead")
        second = start_worker(own_database_url, workers)

        async def second_connected() -> bool:
            sessions = await node.pool.fetchval("select count(*) from pg_stat_activity where application_name like $1",
                                                f"tally-projection-%-{second.pid}")
            return bool(sessions == len(names))

        await eventually(second_connected, timeout=30, what="the second worker to stand by")
        first.send_signal(signal.SIGKILL)
        await eventually(lambda: led_by(second.pid), timeout=5, what="the second worker to take over")

        await Workload(node.bus, seed=9).run(50)
        await eventually(node.caught_up, what="the second worker to apply new events")
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 30) == 0
    finally:
        await node.close()


async def test_status_and_rebuild_commands(own_database_url: str) -> None:
    node = await Node.open(own_database_url)
    try:
        await Workload(node.bus, seed=21).run(200)
        events = await node.pool.fetchval("select count(*) from events")
    finally:
        await node.close()

    shown = await asyncio.to_thread(backend, own_database_url, "status")
    assert shown.returncode == 0, shown.stderr
    assert all(name in shown.stdout for name in registry.names()) and "stopped" in shown.stdout

    rebuilt = await asyncio.to_thread(backend, own_database_url, "rebuild", "--all", "--batch-size", "100")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"{events:,} events" in rebuilt.stdout and "ev/s" in rebuilt.stderr

    shown = await asyncio.to_thread(backend, own_database_url, "status", "--json")
    found = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [f["name"] for f in found] == registry.names()
    assert all(f["checkpoint"] == f["head"] >= events and f["lag_events"] == 0 for f in found)

    assert (await asyncio.to_thread(backend, own_database_url, "rebuild")).returncode == 2
    unknown = await asyncio.to_thread(backend, own_database_url, "rebuild", "nosuch")
    assert unknown.returncode == 2 and "unknown projection" in unknown.stderr  # bad input, as argparse's
    for size in ("0", "-1", "99999999999999999999"):  # 0 looped for ever holding a transaction
        refused = await asyncio.to_thread(backend, own_database_url, "rebuild", "balances", "--batch-size", size)
        assert refused.returncode == 2 and "--batch-size: must be from 1 to" in refused.stderr, refused.stderr


def test_worker_help_prints_usage_and_starts_nothing(tmp_path: os.PathLike[str]) -> None:
    """`--help` answers and exits; an unknown argument is refused. Neither opens a database: with
    DATABASE_URL unset the worker would otherwise start an embedded server under ./.data/."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    shown = subprocess.run([sys.executable, "-m", "projections", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: python -m projections")
    refused = subprocess.run([sys.executable, "-m", "projections", "--bogus"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "unrecognized arguments: --bogus" in refused.stderr
    assert not (Path(tmp_path) / ".data").exists()



@contextlib.asynccontextmanager
async def swap_held(node: Node, name: str) -> AsyncIterator[None]:
    """Hold the projection's checkpoint row, as a live runner's batch does: a rebuild of it replays the
    whole log, then waits at its swap, its schemas all made, until the block exits."""
    async with node.pool.acquire() as conn:
        await checkpoints.load(conn, name)
        async with conn.transaction():
            await conn.execute(checkpoints.FENCE_SQL, name)
            yield


async def waiting_to_swap(node: Node, name: str) -> bool:
    return bool(await node.pool.fetchval("select count(*) from pg_stat_activity where application_name = $1 "
                                         "and wait_event_type = 'Lock'", f"tally-rebuild-{name}"))


async def sessions_ended(node: Node, name: str) -> bool:
    return not await node.pool.fetchval("select count(*) from pg_stat_activity where application_name = $1",
                                        f"tally-rebuild-{name}")


async def test_a_rebuild_whose_sessions_are_terminated_leaves_no_schema(own_database_url: str) -> None:
    """Its sessions ended by the server midway (pg_terminate_backend, a restart): the rebuild used to try
    to drop its schemas on those very sessions, failed, and left every `tally_rebuild_*` behind."""
    node = await Node.open(own_database_url)
    try:
        await Workload(node.bus, seed=22).run(200)
        async with swap_held(node, "balances"):
            rebuilding = start_rebuild(own_database_url, "--all", "--batch-size", "10")
            try:
                await eventually(lambda: waiting_to_swap(node, "balances"), timeout=60, what="the rebuild to swap")
                assert len(await node.pool.fetchval(REBUILD_SCHEMAS_SQL)) == len(registry.names())
                ended = await node.pool.fetchval("select count(pg_terminate_backend(pid)) from pg_stat_activity "
                                                 "where application_name like 'tally-rebuild-%'")
                assert ended == len(registry.names()) + 1  # one per projection, and the reader
                _, stderr = await asyncio.to_thread(rebuilding.communicate, timeout=60)
            finally:
                if rebuilding.poll() is None:
                    rebuilding.kill()
                    rebuilding.communicate()
        assert rebuilding.returncode != 0
        assert "could not drop" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("tally:")], stderr
        assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) is None
    finally:
        await node.close()


async def test_a_second_rebuild_of_a_projection_being_rebuilt_is_refused_with_status_3(own_database_url: str) -> None:
    """One line and its own exit status, before it makes anything: it used to log a failure besides the
    error line and exit 1, as a rebuild that broke does."""
    node = await Node.open(own_database_url)
    try:
        await Workload(node.bus, seed=23).run(200)
        async with swap_held(node, "balances"):
            with killed_on_failure(start_rebuild(own_database_url, "balances")) as first:
                await eventually(lambda: waiting_to_swap(node, "balances"), timeout=60, what="the rebuild to swap")
                second = await asyncio.to_thread(backend, own_database_url, "rebuild", "stats", "balances")
                assert second.returncode == 3, second.stderr
                assert second.stderr.splitlines() == ["tally: error: already being rebuilt: balances; "
                                                      "nothing was changed"]
                assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) == ["tally_rebuild_balances"]
        _, stderr = await asyncio.to_thread(first.communicate, timeout=60)
        assert first.returncode == 0, stderr
        assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) is None
    finally:
        await node.close()


async def test_a_rebuild_drops_what_a_dead_rebuild_left_and_never_a_running_ones(own_database_url: str) -> None:
    """A rebuild killed outright (kill -9) leaves its schema. Status notes it; the next rebuild, of any
    projection, drops it, and keeps the schema of a rebuild still running (its lock is held). A
    rebuild used to drop only a leftover of the projections it rebuilt."""
    node = await Node.open(own_database_url)
    try:
        await Workload(node.bus, seed=24).run(200)
        async with swap_held(node, "deposits"):
            with killed_on_failure(start_rebuild(own_database_url, "deposits")) as running:
                await eventually(lambda: waiting_to_swap(node, "deposits"), timeout=60, what="the rebuild to swap")
                async with swap_held(node, "stats"):
                    dead = start_rebuild(own_database_url, "stats")
                    await eventually(lambda: waiting_to_swap(node, "stats"), timeout=60, what="the rebuild to swap")
                    dead.send_signal(signal.SIGKILL)
                    dead.communicate()
                await eventually(lambda: sessions_ended(node, "stats"), what="the dead rebuild's sessions to end")
                left = ["tally_rebuild_deposits", "tally_rebuild_stats"]
                assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) == left

                shown = await asyncio.to_thread(backend, own_database_url, "status")
                assert shown.returncode == 0, shown.stderr
                assert shown.stderr.splitlines() == ["tally: note: schema tally_rebuild_stats is left from a rebuild "
                                                     "that did not finish; the next rebuild drops it"]

                rebuilt = await asyncio.to_thread(backend, own_database_url, "rebuild", "balances")
                assert rebuilt.returncode == 0, rebuilt.stderr
                assert "dropped schema tally_rebuild_stats, left by a rebuild that did not finish" in rebuilt.stderr
                assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) == ["tally_rebuild_deposits"]
        _, stderr = await asyncio.to_thread(running.communicate, timeout=60)
        assert running.returncode == 0, stderr
        assert await node.pool.fetchval(REBUILD_SCHEMAS_SQL) is None
        shown = await asyncio.to_thread(backend, own_database_url, "status")
        assert shown.returncode == 0 and not shown.stderr, shown.stderr
    finally:
        await node.close()
