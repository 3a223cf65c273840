"""Background chores of a serving process: dropping idempotency records past their retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from backend.appkeys import POOL, SETTINGS, SUPERVISOR
from backend.store import idempotency

log = logging.getLogger(__name__)


async def purge_idempotency_keys(app: web.Application) -> None:
    settings = app[SETTINGS]
    retention = timedelta(hours=settings.idempotency_retention_h)
    while True:  # a failed purge ends the run: the Supervisor starts another with backoff
        removed = await idempotency.purge(app[POOL], retention)
        if removed:
            log.info("purged idempotency records", extra={"removed": removed})
        await asyncio.sleep(settings.housekeeping_interval_s)


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    supervisor = app[SUPERVISOR]
    job = supervisor.spawn("idempotency-purge", lambda: purge_idempotency_keys(app))
    try:
        yield
    finally:
        await supervisor.stop(job)
