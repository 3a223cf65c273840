"""This process's projection runners (one per projection, each leading or standing by) and the
read-your-writes watcher they keep informed. Used by `serve` (runtime.py) and `python -m projections`."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from backend.config import Settings
from backend.db import connect_kwargs, init_connection
from backend.store.listener import Listener
from backend.store.tail import LogTail
from backend.supervisor import Supervised, Supervisor
from projections.base import Projection
from projections.feed import LogFeed
from projections.leader import Connect
from projections.runner import Runner, RunnerConfig
from projections.waiting import CheckpointWatcher


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
        supervisor: Supervisor | None = None,
        tail: LogTail | None = None,
    ) -> None:
        """tail: the process's one log tail, which feeds every runner the newest events (None: each
        runner reads them itself, woken by the listener)."""
        self.watcher = watcher
        self.feed = LogFeed(tail, capacity=max(10_000, 2 * settings.projection_batch_size)) \
            if tail is not None and projections else None
        config = RunnerConfig.from_settings(settings)
        self.runners = [Runner(projection, connect, config, listener=listener, on_advance=watcher.advanced,
                               feed=self.feed) for projection in projections]
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._jobs: list[Supervised] = []

    def runner(self, name: str) -> Runner:
        return next(r for r in self.runners if r.name == name)

    async def start(self) -> None:
        """One supervised job per runner: a run that fails is started again with backoff."""
        if self.feed is not None:
            await self.feed.start()
        self._jobs = [self._supervisor.spawn(f"projection-{r.name}", r.run) for r in self.runners]

    async def stop(self) -> None:
        """Stop every runner (an unfinished batch rolls back with its connection); never raises.

        The runners' stopping flag ends them at their next turn even if a cancellation is lost."""
        for runner in self.runners:
            runner.stopping = True
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            await self._supervisor.stop(job)
        if self.feed is not None:
            self.feed.close()
