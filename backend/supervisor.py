"""Background tasks that outlive any failure: each runs under the process's Supervisor, which restarts it.

A job is a coroutine function meant to run until cancelled (the LISTEN connection, the SSE tail, a
projection runner...). Whatever a run raises ends that run, not the job: a lost connection, a client
library confused by a server restart, a bug. The supervisor starts it again after a backoff that
doubles from min_delay_s to max_delay_s, and counts the restart. One log line per outage: a WARNING
with the reason at the first failure (with the traceback when it is not a database outage, since that
is a bug), nothing while it keeps failing, one INFO once a run has lasted settle_s. CancelledError ends
the job; a run that returns has finished it ("done").

A job that requests depend on and that has kept failing for stuck_after_s is "stuck" (health
readiness reports it). stop() and close() never raise: a job's past failures are history, not a reason
for a shutdown to fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from backend.db import describe, is_unavailable

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]

RUNNING, FAILING, DONE, STOPPED = "running", "failing", "done", "stopped"


@dataclass(slots=True)
class TaskState:
    name: str
    state: str = RUNNING
    restarts: int = 0
    """Runs started again after a failure, since the process started."""
    consecutive_failures: int = 0
    """Failures since the last run that lasted settle_s (0: healthy)."""
    last_error: str | None = None
    failing_since: float | None = None
    """time.monotonic() of the first failure of the current outage."""
    serves: bool = True
    """Whether requests depend on it, so that it failing beyond stuck_after_s makes the process unready."""

    def report(self) -> dict[str, object]:
        return {"state": self.state, "restarts": self.restarts,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error}


class Supervised:
    """One spawned job: its asyncio task and its state."""

    def __init__(self, state: TaskState, task: asyncio.Task[None]) -> None:
        self.state = state
        self.task = task

    async def stop(self) -> None:
        """Cancel the job and wait for it to end; never raises what a run raised.

        Cancelled again until done: on Python 3.11 asyncio.wait_for() can swallow a cancellation that
        arrives as its inner wait completes."""
        task = self.task
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        if not task.cancelled() and task.exception() is not None:  # only a BaseException gets here
            log.error("background task ended with an error", extra={"task": self.state.name},
                      exc_info=task.exception())
        if self.state.state != DONE:
            self.state.state = STOPPED


class Supervisor:
    def __init__(self, *, min_delay_s: float = 0.1, max_delay_s: float = 5.0, settle_s: float = 1.0,
                 stuck_after_s: float = 30.0) -> None:
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self.settle_s = settle_s
        self.stuck_after_s = stuck_after_s
        self.tasks: dict[str, TaskState] = {}
        """By name; a name spawned again (a component restarted) keeps its counts."""
        self._spawned: set[Supervised] = set()

    def spawn(self, name: str, job: Job, *, serves: bool = True) -> Supervised:
        """Run job until stopped. serves=False for a job whose failure leaves every request answered as
        it should be (the Merkle folder): reported and counted, never stuck."""
        state = self.tasks.setdefault(name, TaskState(name, serves=serves))
        state.state = RUNNING if not state.consecutive_failures else FAILING
        handle = Supervised(state, asyncio.create_task(self._supervise(state, job), name=name))
        self._spawned.add(handle)
        return handle

    async def stop(self, handle: Supervised | None) -> None:
        if handle is not None:
            self._spawned.discard(handle)
            await handle.stop()

    async def close(self) -> None:
        """Stop whatever is still running (components normally stop their own jobs first)."""
        for handle in list(self._spawned):
            await self.stop(handle)

    def restarts(self) -> dict[str, int]:
        return {name: state.restarts for name, state in sorted(self.tasks.items())}

    def report(self) -> dict[str, dict[str, object]]:
        return {name: state.report() for name, state in sorted(self.tasks.items())}

    def stuck(self) -> list[str]:
        """Jobs that requests depend on, failing without a break for more than stuck_after_s."""
        now = time.monotonic()
        return [name for name, state in sorted(self.tasks.items()) if state.serves
                and state.failing_since is not None and now - state.failing_since > self.stuck_after_s]

    def delay(self, failures: int) -> float:
        return float(min(self.max_delay_s, self.min_delay_s * 2 ** max(0, failures - 1)))

    async def _supervise(self, state: TaskState, job: Job) -> None:
        loop = asyncio.get_running_loop()
        while True:
            settled = loop.call_later(self.settle_s, self._recovered, state)
            try:
                await job()
            except Exception as exc:
                settled.cancel()
                delay = self._failed(state, exc)
                await asyncio.sleep(delay)
                state.restarts += 1
                continue
            finally:
                settled.cancel()
            state.state = DONE
            return

    def _failed(self, state: TaskState, exc: Exception) -> float:
        state.consecutive_failures += 1
        state.last_error = describe(exc)
        state.state = FAILING
        delay = self.delay(state.consecutive_failures)
        if state.failing_since is None:
            state.failing_since = time.monotonic()
            log.warning("background task failed, restarting it", exc_info=None if is_unavailable(exc) else exc,
                        extra={"task": state.name, "reason": state.last_error, "retry_in_s": delay})
        return delay

    def _recovered(self, state: TaskState) -> None:
        if state.failing_since is not None:
            log.info("background task recovered", extra={
                "task": state.name, "failures": state.consecutive_failures,
                "outage_s": round(time.monotonic() - state.failing_since, 1)})
        state.state = RUNNING
        state.consecutive_failures = 0
        state.failing_since = None
