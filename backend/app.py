"""create_app(settings): the one wiring point. Every resource is opened and closed in a cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from backend.appkeys import (
    AUTH_FAILURES,
    AUTHENTICATOR,
    COMMANDS,
    DATABASE_DSN,
    LISTENER,
    LOG_TAIL,
    METRICS,
    POOL,
    REPOSITORY,
    SETTINGS,
    STORE,
    SUPERVISOR,
)
from backend.audit.runtime import audit_ctx
from backend.commands.bus import CommandBus
from backend.config import Settings
from backend.db import connect_kwargs, create_pool, ensure_database, mask_dsn
from backend.event_loop import loop_name
from backend.housekeeping import housekeeping_ctx
from backend.http import api_keys, audit, audit_tree, cors, deposits, health, openapi, queries, stream_tokens, wallets
from backend.http.auth import auth_middleware
from backend.http.auth_failures import AuthFailures
from backend.http.authenticator import ApiKeyAuthenticator
from backend.http.metrics import Metrics, metrics_middleware
from backend.http.middlewares import error_middleware, request_id_middleware
from backend.http.openapi import OPENAPI
from backend.http.ratelimit import RateLimiter, rate_limit_middleware
from backend.http.routing import add_routes
from backend.http.signed_tokens import STREAM_TOKENS, StreamTokens
from backend.http.static import routes as static_routes
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.store.migrate import migrate
from backend.store.repository import Repository
from backend.store.tail import LogTail
from backend.streaming import sse as streaming
from backend.supervisor import Supervisor
from projections.runtime import projections_ctx

log = logging.getLogger(__name__)

EMBEDDED_DATABASE = "tally"


@contextlib.asynccontextmanager
async def database_dsn(settings: Settings) -> AsyncIterator[str]:
    """Yield DATABASE_URL, or start the embedded PostgreSQL under DATA_DIR/pg when it is unset."""
    dsn = settings.dsn()
    if dsn is not None:
        yield dsn
        return
    from backend.embedded_pg import start_embedded

    server = await asyncio.to_thread(start_embedded, settings.data_dir / "pg")
    try:
        await ensure_database(server.dsn("postgres"), EMBEDDED_DATABASE)
        yield server.dsn(EMBEDDED_DATABASE)
    finally:
        await asyncio.to_thread(server.stop)


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    async with database_dsn(app[SETTINGS]) as dsn:
        app[DATABASE_DSN] = dsn
        yield


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    dsn = app[DATABASE_DSN]
    pool = await create_pool(dsn, settings)
    log.info("database pool open", extra={"database": mask_dsn(dsn), "max_size": settings.pool_max_size})
    app[POOL] = pool
    try:
        if settings.apply_migrations:
            async with pool.acquire() as conn:
                await migrate(conn)
        yield
    finally:
        await pool.close()


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The event store (with its append batcher) and this process's one LISTEN connection."""
    settings = app[SETTINGS]
    store = EventStore(app[POOL], max_batch_events=settings.append_batch_max_events)
    listener = Listener(app[DATABASE_DSN], poll_interval_s=settings.listener_poll_s,
                        connect_kwargs=connect_kwargs(settings), supervisor=app[SUPERVISOR])
    await listener.start(timeout=settings.connect_timeout_s + 5)
    app[STORE] = store
    app[LISTENER] = listener
    app[LOG_TAIL] = tail = LogTail(app[POOL], listener, page_size=settings.sse_page_size,
                                   idle_s=settings.sse_checkpoint_s, supervisor=app[SUPERVISOR])
    repository = Repository(store, snapshot_every=settings.snapshot_every)
    app[REPOSITORY] = repository
    commands = CommandBus(repository)
    app[COMMANDS] = commands
    metrics = app[METRICS]
    metrics.gauge("tally_event_store_head", "Highest position this process has seen", lambda: listener.head)
    metrics.gauge("tally_append_batches_total", "Append transactions committed", lambda: store.counters().batches)
    metrics.gauge("tally_append_requests_total", "Append calls carried by those transactions",
                  lambda: store.counters().batched_requests)
    store.observe_batches(metrics.histogram(
        "tally_append_batch_duration_seconds",
        "Append transactions from start to commit (the disk flush included), as this process saw them").observe)
    metrics.gauge("tally_command_conflicts_total", "Optimistic appends lost to another writer and retried",
                  lambda: commands.conflicts)
    metrics.gauge("tally_listener_reconnects_total", "Times the LISTEN connection was re-established",
                  lambda: listener.reconnects)
    authenticator = ApiKeyAuthenticator(repository, listener, negative_ttl_s=settings.auth_negative_ttl_s,
                                        supervisor=app[SUPERVISOR])
    app[AUTHENTICATOR] = authenticator
    metrics.gauge("tally_api_key_lookups_total", "API key lookups that went to the database",
                  lambda: authenticator.loads)
    try:
        await authenticator.start()
        yield
    finally:
        await authenticator.close()
        await tail.close()
        await store.close()
        await listener.close()


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last to close: whatever background job a component left running is stopped (never raising)."""
    try:
        yield
    finally:
        await app[SUPERVISOR].close()


ROUTE_TABLES = (health.routes, openapi.routes, wallets.routes, deposits.routes, api_keys.routes, audit.routes,
                audit_tree.routes, queries.routes, stream_tokens.routes, streaming.routes, static_routes)


def create_app(settings: Settings) -> web.Application:
    metrics = Metrics()
    metrics.info("tally_event_loop_info", "The asyncio event loop serving this process (EVENT_LOOP)",
                 lambda: {"loop": loop_name()})
    middlewares: list[Middleware] = [request_id_middleware, metrics_middleware(metrics), error_middleware,
                                     auth_middleware]
    if settings.rate_limit_per_s > 0 and settings.rate_limit_burst > 0:  # after auth: it limits per key
        middlewares.append(rate_limit_middleware(RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)))
    origins = settings.allowed_origins()
    if origins:  # outermost: a preflight is answered before anything else looks at it
        middlewares.insert(0, cors.cors_middleware(origins))
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    if origins:
        app.on_response_prepare.append(cors.cors_headers(origins))
    app[METRICS] = metrics
    supervisor = Supervisor()
    app[SUPERVISOR] = supervisor
    metrics.counters("tally_background_task_restarts_total",
                     "Background tasks (listener, stream tail, projection runners...) restarted after a failure",
                     "task", supervisor.restarts)
    app.cleanup_ctx.append(supervisor_ctx)
    if settings.auth_failure_rate_per_s > 0 and settings.auth_failure_burst > 0:
        failures = AuthFailures(RateLimiter(settings.auth_failure_rate_per_s, settings.auth_failure_burst,
                                            max_buckets=settings.auth_failure_max_addresses),
                                settings.trusted_networks(), hold_s=settings.auth_failure_hold_s,
                                max_held=settings.auth_failure_max_held)
        app[AUTH_FAILURES] = failures
        metrics.gauge("tally_auth_failures_total", "Failed authentications", lambda: failures.failures)
        metrics.gauge("tally_auth_refused_total", "Requests refused (429) after too many failed authentications",
                      lambda: failures.refused)
    app[STREAM_TOKENS] = StreamTokens.from_settings(settings)
    app.cleanup_ctx.append(database_ctx)
    app.cleanup_ctx.append(pool_ctx)
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)
    app.cleanup_ctx.append(projections_ctx)
    app.cleanup_ctx.append(audit_ctx)
    app.cleanup_ctx.append(streaming.hub_ctx)
    app.on_shutdown.append(streaming.close_streams)
    for table in ROUTE_TABLES:
        add_routes(app, table)
    app[OPENAPI] = openapi.document_bytes(app)
    return app
