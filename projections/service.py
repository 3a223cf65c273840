"""This process's projection runners (one per projection, each leading or standing by) and the
read-your-writes watcher they keep informed. Used by `serve` (runtime.py) and `python -m projections`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import asyncpg

from backend.config import Settings
from backend.db import connect_kwargs, init_connection
from backend.store.listener import Listener
from projections.base import Projection
from projections.feed import LogFeed
from projections.runner import Connect, Runner
from projections.waiting import CheckpointWatcher

log = logging.getLogger(__name__)


def connector(dsn: str, settings: Settings, *, durable_commits: bool = True) -> Connect:
    """Dedicated connections, set up like the pool's and named for pg_stat_activity.

    `durable_commits=False` is for runners following the log: their commits then do not wait for the
    WAL to reach the disk (synchronous_commit off). That is safe because each batch's rows and its
    checkpoint commit together: a crash can only lose whole batches, which the runner applies again
    from the log (whose appends stay durable). It keeps a dozen projection commits a second out of
    the queue for the disk flush that every append's answer waits for."""
    base = connect_kwargs(settings)
    settings_for_server = {**base["server_settings"]}
    if not durable_commits:
        settings_for_server["synchronous_commit"] = "off"

    async def connect(application_name: str) -> asyncpg.Connection[asyncpg.Record]:
        kwargs = {**base, "server_settings": {**settings_for_server, "application_name": application_name}}
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn, **kwargs)
        try:
            await init_connection(conn)
        except BaseException:
            conn.terminate()
            raise
        return conn

    return connect


class ProjectionService:
    def __init__(
        self,
        projections: Sequence[Projection],
        connect: Connect,
        watcher: CheckpointWatcher,
        settings: Settings,
        listener: Listener | None = None,
    ) -> None:
        self.watcher = watcher
        self.feed = LogFeed(page_size=settings.projection_batch_size,
                            capacity=max(10_000, 2 * settings.projection_batch_size))
        self.runners = [
            Runner(
                projection,
                connect,
                listener=listener,
                batch_size=settings.projection_batch_size,
                poll_s=settings.projection_poll_s,
                standby_retry_s=settings.projection_standby_retry_s,
                max_backoff_s=settings.projection_max_backoff_s,
                on_advance=watcher.advanced,
                feed=self.feed,
                idle_checkpoint_s=settings.projection_idle_checkpoint_s,
            )
            for projection in projections
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def runner(self, name: str) -> Runner:
        return next(r for r in self.runners if r.name == name)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(r.run(), name=f"projection-{r.name}") for r in self.runners]

    async def stop(self) -> None:
        """Stop every runner; an unfinished batch rolls back with its connection.

        Cancelled again until done: on Python 3.11 asyncio.wait_for() (the Listener waits with it) can
        swallow a cancellation that arrives as its inner wait completes; the runners' stopping flag
        ends them at their next turn in any case."""
        for runner in self.runners:
            runner.stopping = True
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in self._tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("projection runner ended with an error", exc_info=task.exception())
        self._tasks = []
