"""The projections worker's own small HTTP server: /metrics, /health/live and /health/ready, the same
handlers as `serve`'s, on PROJECTIONS_METRICS_PORT (or `python -m projections --port`); off when 0."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from backend.appkeys import METRICS, POOL, SETTINGS, SUPERVISOR
from backend.config import Settings
from backend.event_loop import loop_name
from backend.http import health
from backend.http.metrics import Metrics, metrics_middleware
from backend.http.middlewares import error_middleware, request_id_middleware
from backend.metric_sources import watch_build, watch_pool, watch_store
from backend.server.run import Serving, start
from backend.server.site import CannotListen
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.supervisor import Supervisor
from projections import registry
from projections.metrics import ProjectionMetrics


def worker_metrics(pool: asyncpg.Pool, store: EventStore, listener: Listener, supervisor: Supervisor) -> Metrics:
    """The worker's registry: the metrics of `serve` that apply to it (no HTTP API, no streams)."""
    metrics = Metrics()
    metrics.info("tally_event_loop_info", "The asyncio event loop serving this process (EVENT_LOOP)",
                 lambda: {"loop": loop_name()})
    watch_build(metrics)
    watch_pool(metrics, pool)
    metrics.counters("tally_background_task_restarts_total",
                     "Background tasks (listener, projection runners...) restarted after a failure",
                     "task", supervisor.restarts)
    watch_store(metrics, store, listener)
    watch = ProjectionMetrics(pool, registry.names())
    metrics.register(watch)
    metrics.before_scrape.append(watch.refresh)
    return metrics


def worker_app(settings: Settings, pool: asyncpg.Pool, metrics: Metrics, supervisor: Supervisor) -> web.Application:
    app = web.Application(middlewares=[request_id_middleware, metrics_middleware(metrics), error_middleware])
    app[SETTINGS] = settings
    app[POOL] = pool
    app[METRICS] = metrics
    app[SUPERVISOR] = supervisor
    app.add_routes(health.routes)
    return app


async def serve_worker_http(app: web.Application, settings: Settings) -> Serving:
    """Listening on HOST:PROJECTIONS_METRICS_PORT (else CannotListen, one line) with `serve`'s protocol:
    problem+json for what the HTTP parser refuses, the header-read timeout, the drain. The caller stops it."""
    try:
        return await start(app, settings.model_copy(update={"port": settings.projections_metrics_port}))
    except CannotListen as exc:
        raise CannotListen(f"cannot serve metrics: {exc}") from None
