"""A small HTTP server of /metrics, /health/live and /health/ready, the same handlers as `serve`'s: the
projections worker's, on PROJECTIONS_METRICS_PORT (or `python -m projections --port`), and each `serve`
process's, on METRICS_PORT + its worker index; off when 0."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
from aiohttp import web

from backend.appkeys import METRICS, POOL, READ_POOLS, SETTINGS, SUPERVISOR
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

log = logging.getLogger("backend")

WORKER_HEADER = "X-Tally-Worker"
"""On every answer of a worker of `serve --workers N`: its index (0..N-1), so that a client or a test can
tell which worker answered; absent with one process."""


def name_worker(index: int) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An on_response_prepare signal that puts WORKER_HEADER on every answer."""
    value = str(index)

    async def named(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[WORKER_HEADER] = value

    return named


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


async def serve_worker_http(app: web.Application, settings: Settings, port: int | None = None) -> Serving:
    """Listening on HOST:port (default PROJECTIONS_METRICS_PORT; else CannotListen, one line) with `serve`'s
    protocol: problem+json for what the HTTP parser refuses, the header-read timeout, the drain. The caller
    stops it."""
    port = settings.projections_metrics_port if port is None else port
    try:
        return await start(app, settings.model_copy(update={"port": port}))
    except CannotListen as exc:
        raise CannotListen(f"cannot serve metrics: {exc}") from None


def metrics_port_ctx(first_port: int, worker: int | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """`serve`'s /metrics and /health/* on a port of this process's own, first_port + its worker index
    (named in X-Tally-Worker as on the API's port): behind the one SO_REUSEPORT port of `serve --workers N`
    a scrape reaches whichever worker the kernel picks, so one Prometheus target would read one worker's
    counters, then another's (a counter going back reads as a reset). Added last, it listens once
    everything it reports on runs, and stops first. first_port 0 (METRICS_PORT unset): nothing."""
    port = first_port + (worker or 0)

    async def metrics_port(app: web.Application) -> AsyncIterator[None]:
        if not first_port:
            yield
            return
        settings = app[SETTINGS]
        side = worker_app(settings, app[POOL], app[METRICS], app[SUPERVISOR])
        if READ_POOLS in app:
            side[READ_POOLS] = app[READ_POOLS]
        if worker is not None:
            side.on_response_prepare.append(name_worker(worker))
        serving = await serve_worker_http(side, settings, port)
        log.info(f"serving metrics on http://{settings.host}:{serving.port}", extra={"metrics_port": serving.port})
        try:
            yield
        finally:
            await serving.stop(settings.shutdown_timeout_s, announce=False)  # the API's port announced it

    return metrics_port
