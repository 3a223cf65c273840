"""`python -m backend audit diff-projections` as real processes: two at once on one database, and what a
diff whose session the server ends, or that is killed outright, leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest

from backend.audit.projections_diff import FENCE_SQL
from projections import checkpoints, registry
from tests.conftest import ROOT
from tests.integration.projections.harness import Node
from tests.integration.projections.workload import Workload
from tests.support import eventually
from tests.system.ledger_checks import wait_caught_up

pytestmark = pytest.mark.system

SCHEMAS_SQL = "select coalesce(array_agg(nspname order by nspname), '{}') from pg_namespace " \
              "where starts_with(nspname, 'tally_audit_')"
DIFF_SESSIONS_SQL = "select count(*) from pg_stat_activity where application_name = 'tally-diff'"
COMPARING = f"from pg_stat_activity where datname = current_database() and query = '{FENCE_SQL}' " \
            "and wait_event_type = 'Lock'"
"""The sessions of diffs waiting to compare a projection whose checkpoint row is held."""


def start_diff(dsn: str, command_timeout_s: int = 120) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"}
    env.update(DATABASE_URL=dsn, LOG_FORMAT="text", STATEMENT_TIMEOUT_MS="120000",  # it waits on a held row here
               COMMAND_TIMEOUT_S=str(command_timeout_s))
    return subprocess.Popen([sys.executable, "-m", "backend", "audit", "diff-projections"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.asynccontextmanager
async def ledger(dsn: str, seed: int) -> AsyncIterator[Node]:
    """A log the read models have folded to its head; the runners then stop, so checkpoints hold still."""
    node = await Node.open(dsn)
    try:
        await Workload(node.bus, seed=seed).run(200)
        await node.start()
        await wait_caught_up(node.pool)
        await node.stop()
        yield node
    finally:
        await node.close()


@contextlib.asynccontextmanager
async def compare_held(node: Node, name: str = "balances") -> AsyncIterator[None]:
    """Hold a projection's checkpoint row, as a live runner's batch does: a diff replays the log into its
    schemas, all made, then waits at its compare of that projection until the block exits."""
    async with node.pool.acquire() as conn, conn.transaction():
        await conn.execute(checkpoints.FENCE_SQL, name)
        yield


def waiting_at_compare(node: Node, diffs: Sequence[subprocess.Popen[str]]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        for diff in diffs:
            if diff.poll() is not None:
                _, stderr = diff.communicate()
                raise AssertionError(f"a diff ended before its compare, status {diff.returncode}: {stderr}")
        return bool(await node.pool.fetchval("select count(*) " + COMPARING) == len(diffs))
    return check


async def finished(diff: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return await asyncio.to_thread(diff.communicate, timeout=60)
    finally:
        if diff.poll() is None:
            diff.kill()
            diff.communicate()


def runs(schemas: list[str]) -> set[str]:
    """The run ids of tally_audit_<run>_<projection> schemas."""
    return {schema.removeprefix("tally_audit_").split("_", 1)[0] for schema in schemas}


async def test_two_diffs_at_once_both_compare_and_leave_nothing(own_database_url: str) -> None:
    """Both diffs used to build the same tally_audit_<projection> schemas: one dropped the other's
    (InvalidSchemaNameError, DuplicateTableError), and both exited 2."""
    async with ledger(own_database_url, seed=31) as node:
        async with compare_held(node):
            diffs = [start_diff(own_database_url), start_diff(own_database_url)]
            try:
                await eventually(waiting_at_compare(node, diffs), timeout=60, what="both diffs to reach their compare")
                schemas = await node.pool.fetchval(SCHEMAS_SQL)
                assert len(runs(schemas)) == 2 and len(schemas) == 2 * len(registry.names()), schemas
            except BaseException:
                for diff in diffs:
                    diff.kill()
                raise
        for diff in diffs:
            stdout, stderr = await finished(diff)
            assert diff.returncode == 0, stderr
            assert stdout.splitlines()[-1] == "0 differing row(s) in 0 table(s), 0 error(s)", stdout
        assert await node.pool.fetchval(SCHEMAS_SQL) == []


async def test_a_diff_whose_session_is_terminated_leaves_no_schema(own_database_url: str) -> None:
    """Its session ended by the server midway (pg_terminate_backend, a restart): the diff used to drop
    its schemas on that very session, failed, and left every tally_audit_* behind."""
    async with ledger(own_database_url, seed=32) as node:
        async with compare_held(node):
            diff = start_diff(own_database_url)
            try:
                await eventually(waiting_at_compare(node, [diff]), timeout=60, what="the diff to reach its compare")
                assert len(await node.pool.fetchval(SCHEMAS_SQL)) == len(registry.names())
                ended = await node.pool.fetchval("select count(pg_terminate_backend(pid)) " + COMPARING)
                assert ended == 1
            except BaseException:
                diff.kill()
                raise
            _, stderr = await finished(diff)
        assert diff.returncode == 2, stderr
        assert "could not drop" not in stderr, stderr
        assert [line for line in stderr.splitlines() if line.startswith("tally: error:")], stderr
        assert await node.pool.fetchval(SCHEMAS_SQL) == []


async def test_a_diff_drops_what_a_killed_diff_left_and_never_a_running_ones(own_database_url: str) -> None:
    """A diff killed outright (kill -9) leaves its schemas, and nothing used to drop them. The next diff
    drops them, and keeps those of a diff still running (its run's lock is held)."""
    async with ledger(own_database_url, seed=33) as node:
        async with compare_held(node, "stats"):
            running = start_diff(own_database_url)
            started: list[subprocess.Popen[str]] = [running]
            try:
                await eventually(waiting_at_compare(node, [running]), timeout=60, what="the diff to reach its compare")
                [running_run] = runs(await node.pool.fetchval(SCHEMAS_SQL))
                async with compare_held(node, "balances"):
                    started.append(dead := start_diff(own_database_url))
                    await eventually(waiting_at_compare(node, started), timeout=60, what="the second diff's compare")
                    dead.send_signal(signal.SIGKILL)
                    dead.communicate()
                    started.remove(dead)

                async def dead_session_ended() -> bool:
                    return bool(await node.pool.fetchval(DIFF_SESSIONS_SQL) == 1)

                await eventually(dead_session_ended, what="the killed diff's session to end")
                [dead_run] = runs(await node.pool.fetchval(SCHEMAS_SQL)) - {running_run}
                assert len(await node.pool.fetchval(SCHEMAS_SQL)) == 2 * len(registry.names())

                started.append(later := start_diff(own_database_url))
                await eventually(waiting_at_compare(node, started), timeout=60, what="the third diff's compare")
                left = runs(await node.pool.fetchval(SCHEMAS_SQL))
                assert running_run in left and dead_run not in left and len(left) == 2, left
            except BaseException:
                for diff in started:
                    diff.kill()
                raise
        errors = {diff: (await finished(diff))[1] for diff in (running, later)}
        assert running.returncode == 0 and later.returncode == 0, errors
        dropped = [line for line in errors[later].splitlines() if "left by a diff that did not finish" in line]
        assert len(dropped) == len(registry.names()) and all(f"tally_audit_{dead_run}_" in line for line in dropped)
        assert await node.pool.fetchval(SCHEMAS_SQL) == []


async def test_a_diff_the_database_does_not_answer_says_so(own_database_url: str) -> None:
    """Past COMMAND_TIMEOUT_S the client gives up with a TimeoutError whose message is empty: the diff
    used to print `tally: error: ` and nothing more."""
    async with ledger(own_database_url, seed=34) as node:
        async with compare_held(node):
            diff = start_diff(own_database_url, command_timeout_s=1)
            _, stderr = await finished(diff)
        assert diff.returncode == 2, stderr
        assert stderr.splitlines()[-1] == "tally: error: the database did not answer within COMMAND_TIMEOUT_S (1 s)"
        assert await node.pool.fetchval(SCHEMAS_SQL) == []
