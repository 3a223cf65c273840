"""Background chores of a serving process: dropping idempotency records past their retention."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

from aiohttp import web

from backend.appkeys import POOL, SETTINGS
from backend.db import UNAVAILABLE_ERRORS, describe
from backend.store import idempotency

log = logging.getLogger(__name__)


async def purge_idempotency_keys(app: web.Application) -> None:
    settings = app[SETTINGS]
    retention = timedelta(hours=settings.idempotency_retention_h)
    while True:
        try:
            removed = await idempotency.purge(app[POOL], retention)
            if removed:
                log.info("purged idempotency records", extra={"removed": removed})
        except UNAVAILABLE_ERRORS as exc:
            log.warning("idempotency purge skipped", extra={"reason": describe(exc)})
        await asyncio.sleep(settings.housekeeping_interval_s)


async def housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(purge_idempotency_keys(app), name="idempotency-purge")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
