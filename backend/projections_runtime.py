"""projections_ctx: the app's projections, started with the app and stopped before the store closes.

The read-your-writes watcher is always there (queries need it); the runners only with
RUN_PROJECTIONS (the default), each of them leading or standing by across all processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from backend.appkeys import (
    CLOCK,
    COMMANDS,
    DATABASE_DSN,
    LISTENER,
    LOG_TAIL,
    METRICS,
    POOL,
    PROJECTIONS,
    SETTINGS,
    SUPERVISOR,
)
from projections import registry
from projections.metrics import ProjectionMetrics
from projections.registry import all_projections
from projections.service import ProjectionService, connector
from projections.waiting import CheckpointWatcher


async def projections_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    chosen = all_projections(app[COMMANDS], expiry_batch_size=settings.expiry_batch_size, clock=app[CLOCK]) \
        if settings.run_projections else []
    service = ProjectionService(chosen, connector(app[DATABASE_DSN], settings, durable_commits=False),
                                CheckpointWatcher(app[POOL]), settings, listener=app[LISTENER],
                                supervisor=app[SUPERVISOR], tail=app[LOG_TAIL])
    app[PROJECTIONS] = service
    watch = ProjectionMetrics(app[POOL], registry.names())
    app[METRICS].register(watch)
    app[METRICS].before_scrape.append(watch.refresh)
    await service.start()
    try:
        yield
    finally:
        await service.stop()
