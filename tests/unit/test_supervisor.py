"""The Supervisor restarts a failing job on any exception, logs once per outage, and stops quietly."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable

import asyncpg
import pytest

from backend.supervisor import DONE, FAILING, RUNNING, STOPPED, Supervisor
from tests.conftest import ROOT
from tests.support import eventually


def quick(**overrides: float) -> Supervisor:
    values = {"min_delay_s": 0.01, "max_delay_s": 0.04, "settle_s": 0.2, "stuck_after_s": 30.0}
    values.update(overrides)
    return Supervisor(**values)


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


@pytest.mark.parametrize("error", [
    KeyError("a bug"),
    asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.InterfaceError("pool is closing"),
    ConnectionResetError("reset by peer"),
])
async def test_any_exception_restarts_the_job(error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.supervisor")
    supervisor = quick()
    runs = 0
    serving = asyncio.Event()

    async def job() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise error
        serving.set()
        await asyncio.Event().wait()

    handle = supervisor.spawn("flaky", job)
    await asyncio.wait_for(serving.wait(), 5)
    assert supervisor.restarts() == {"flaky": 3}
    assert supervisor.tasks["flaky"].state == FAILING  # until the run has lasted settle_s
    await eventually(lambda: supervisor.tasks["flaky"].state == RUNNING)
    assert supervisor.tasks["flaky"].consecutive_failures == 0

    failed = records(caplog, "background task failed, restarting it")
    assert len(failed) == 1  # once per outage, not once per failure
    assert failed[0].levelno == logging.WARNING
    assert failed[0].task == "flaky"  # type: ignore[attr-defined]
    assert type(error).__name__ in failed[0].reason  # type: ignore[attr-defined]
    assert (failed[0].exc_info is not None) == isinstance(error, KeyError)  # a bug brings its traceback
    recovered = records(caplog, "background task recovered")
    assert len(recovered) == 1 and recovered[0].levelno == logging.INFO
    assert recovered[0].failures == 3  # type: ignore[attr-defined]

    await handle.stop()
    assert supervisor.tasks["flaky"].state == STOPPED


async def test_a_second_outage_logs_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="backend.supervisor")
    supervisor = quick(settle_s=0.05)
    fail = asyncio.Event()
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1
        await fail.wait()
        fail.clear()
        raise ConnectionError("lost")

    def running(times: int) -> Callable[[], bool]:
        return lambda: supervisor.tasks["listener"].state == RUNNING and runs == times

    def recovered(times: int) -> Callable[[], bool]:
        return lambda: len(records(caplog, "background task recovered")) == times

    supervisor.spawn("listener", job)
    for outage in (1, 2):
        await eventually(running(outage))
        fail.set()
        await eventually(recovered(outage))
    assert len(records(caplog, "background task failed, restarting it")) == 2
    assert supervisor.restarts() == {"listener": 2}
    await supervisor.close()


async def test_stop_never_raises_what_the_job_went_through() -> None:
    supervisor = quick()

    async def job() -> None:
        raise RuntimeError("always")

    handle = supervisor.spawn("broken", job)
    await eventually(lambda: supervisor.tasks["broken"].restarts >= 2)
    await handle.stop()  # no RuntimeError here
    assert handle.task.cancelled()
    assert supervisor.tasks["broken"].state == STOPPED


async def test_cancellation_ends_the_job_and_a_return_finishes_it() -> None:
    supervisor = quick()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def once() -> None:
        return None

    forever_handle = supervisor.spawn("forever", forever)
    once_handle = supervisor.spawn("once", once)
    await asyncio.wait_for(asyncio.shield(once_handle.task), 5)
    assert supervisor.tasks["once"].state == DONE and supervisor.tasks["once"].restarts == 0
    await asyncio.sleep(0)
    await supervisor.close()
    assert cancelled.is_set()
    assert forever_handle.task.cancelled()
    assert supervisor.tasks["forever"].state == STOPPED
    assert supervisor.tasks["forever"].restarts == 0


async def test_a_job_failing_beyond_stuck_after_is_stuck_until_it_recovers() -> None:
    supervisor = quick(stuck_after_s=0.1, settle_s=0.05)
    healthy = asyncio.Event()

    async def job() -> None:
        if not healthy.is_set():
            raise OSError("connection refused")
        await asyncio.Event().wait()

    supervisor.spawn("tail", job)
    supervisor.spawn("folder", job, serves=False)
    await eventually(lambda: supervisor.stuck() == ["tail"])
    assert supervisor.report()["folder"]["state"] == FAILING  # reported, but requests do not need it
    report = supervisor.report()["tail"]
    assert report["state"] == FAILING
    assert isinstance(report["consecutive_failures"], int) and report["consecutive_failures"] >= 2
    assert report["last_error"] == "OSError: connection refused"
    healthy.set()
    await eventually(lambda: supervisor.tasks["tail"].state == RUNNING)
    assert supervisor.stuck() == []
    await supervisor.close()


def test_backoff_doubles_up_to_the_maximum() -> None:
    supervisor = Supervisor(min_delay_s=0.1, max_delay_s=1.0)
    assert [supervisor.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_the_supervisor_does_not_import_aiohttp() -> None:
    """It is shared by the HTTP process and `python -m projections`: no web framework in it."""
    probe = "import sys, backend.supervisor; sys.exit('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=False).returncode == 0
