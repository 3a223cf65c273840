"""create_app(settings): the one wiring point. Every resource is opened and closed in a cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from backend.appkeys import (
    AUTH_FAILURES,
    AUTHENTICATOR,
    CLOCK,
    COMMANDS,
    CORE,
    DATABASE_DSN,
    DEPOSIT_COMMANDS,
    LISTENER,
    LOG_TAIL,
    LOG_VERIFICATION,
    METRICS,
    OPENAPI,
    POOL,
    READ_POOLS,
    REPOSITORY,
    SETTINGS,
    SHARED_LIMITS,
    STATE_REPLAY,
    STORE,
    STREAM_TOKENS,
    SUPERVISOR,
    WORKER,
)
from backend.audit_runtime import audit_ctx, signer_ctx
from backend.bootstrap import open_core
from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.deposits import DepositCommands
from backend.config import Settings
from backend.event_loop import loop_name
from backend.housekeeping import housekeeping_ctx
from backend.http import api_keys, audit, audit_tree, cors, deposits, health, openapi, queries, stream_tokens, wallets
from backend.http import streams as streaming
from backend.http.auth import auth_middleware
from backend.http.auth_failures import AuthFailures
from backend.http.authenticator import ApiKeyAuthenticator
from backend.http.heavy_reads import STATE_REPLAYS_AT_ONCE, WHOLE_LOG_VERIFICATIONS_AT_ONCE, HeavyReads
from backend.http.metrics import Metrics, metrics_middleware
from backend.http.middlewares import error_middleware, request_id_middleware
from backend.http.ratelimit import HostRateLimiter, Limiter, RateLimiter, rate_limit_middleware
from backend.http.routing import add_routes
from backend.http.signed_tokens import StreamTokens
from backend.http.static import routes as static_routes
from backend.metric_sources import watch_build, watch_pool, watch_replicas, watch_store, watch_streams
from backend.projections_runtime import projections_ctx
from backend.server.metrics_site import metrics_port_ctx, name_worker
from backend.server.workers import WorkerPlace
from backend.shared_limits import SharedLimits
from backend.store.read_pools import open_replica
from backend.store.replica_check import TASK as REPLICA_CHECK
from backend.store.replica_check import ReplicaChecker
from backend.supervisor import Supervisor

log = logging.getLogger(__name__)


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    """The core (backend.bootstrap.open_core: database, pool, store, listener, repository, bus), keyed for
    the handlers; it closes after every context added later."""
    async with open_core(app[SETTINGS], clock=app[CLOCK], supervisor=app[SUPERVISOR]) as core:
        app[CORE] = core
        app[DATABASE_DSN] = core.direct_dsn
        app[POOL] = core.pool
        app[STORE] = core.store
        app[LISTENER] = core.listener
        app[LOG_TAIL] = core.tail
        app[REPOSITORY] = core.repository
        app[COMMANDS] = core.bus
        secret = app[SETTINGS].deposit_address_secret.get_secret_value().encode()
        app[DEPOSIT_COMMANDS] = DepositCommands(core.repository, secret)
        watch_pool(app[METRICS], core.pool)
        yield


async def read_pools_ctx(app: web.Application) -> AsyncIterator[None]:
    """Where reads go (READ_DATABASE_URL's replicas, else the primary), and the task that checks the
    replicas' lag; with no replica every read goes to the primary's pool, as it always did."""
    settings = app[SETTINGS]
    pools = app[READ_POOLS] = app[CORE].reads  # the log tail reads through these too
    job = None
    try:
        for dsn in settings.read_dsns():
            pools.replicas.append(await open_replica(dsn, settings))
        if pools.replicas:
            checker = ReplicaChecker(pools, max_lag_s=settings.replica_max_lag_s,
                                     timeout_s=settings.connect_timeout_s)
            # never awaited here: a replica that does not answer would hold up startup for CONNECT_TIMEOUT_S;
            # until its first check, the primary serves its reads
            job = app[SUPERVISOR].spawn(REPLICA_CHECK, lambda: checker.run(settings.replica_check_s))
            watch_replicas(app[METRICS], pools)
        yield
    finally:
        await app[SUPERVISOR].stop(job)
        await pools.close()


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The core's gauges, and the API key authenticator that follows the log."""
    settings = app[SETTINGS]
    store, listener, repository, commands = app[STORE], app[LISTENER], app[REPOSITORY], app[COMMANDS]
    metrics = app[METRICS]
    watch_store(metrics, store, listener)
    metrics.counter("tally_command_conflicts_total", "Optimistic appends lost to another writer and retried",
                    lambda: commands.conflicts)
    authenticator = ApiKeyAuthenticator(repository, app[LOG_TAIL], negative_ttl_s=settings.auth_negative_ttl_s,
                                        wall_clock=app[CLOCK])
    app[AUTHENTICATOR] = authenticator
    metrics.counter("tally_api_key_lookups_total", "API key lookups that went to the database",
                    lambda: authenticator.loads)
    caches, tail = None, app[LOG_TAIL]
    if app.get(WORKER) is not None:  # other workers append: follow them rather than forget the caches
        caches = tail.subscribe("caches", repository.follow_log)
        tail.want(caches, True)
    try:
        await authenticator.start()
        yield
    finally:
        if caches is not None:
            tail.unsubscribe(caches)
        await authenticator.close()


async def supervisor_ctx(app: web.Application) -> AsyncIterator[None]:
    """Last to close: whatever background job a component left running is stopped (never raising)."""
    try:
        yield
    finally:
        await app[SUPERVISOR].close()


ROUTE_TABLES = (health.routes, openapi.routes, wallets.routes, deposits.routes, api_keys.routes, audit.routes,
                audit_tree.routes, queries.routes, stream_tokens.routes, streaming.routes, static_routes)


def worker_ctx(host_limiter: HostRateLimiter | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """A worker of several maps the host's limits table (the rate limiter and the hub use it)."""

    async def shared_limits(app: web.Application) -> AsyncIterator[None]:
        place, settings = app[WORKER], app[SETTINGS]
        if place.limits is None:
            yield
            return
        shared = SharedLimits.open(place.limits, place.index, rate_per_s=settings.rate_limit_per_s,
                                   burst=settings.rate_limit_burst)
        app[SHARED_LIMITS] = shared
        if host_limiter is not None:
            host_limiter.shared = shared
        try:
            yield
        finally:
            if host_limiter is not None:
                host_limiter.shared = None
            shared.close()

    return shared_limits


def middleware_chain(settings: Settings, metrics: Metrics, worker: WorkerPlace | None
                     ) -> tuple[list[Middleware], HostRateLimiter | None]:
    """The middlewares, outermost first: CORS (when origins are allowed: a preflight is answered before
    anything else looks at it), the request id, metrics, errors as problem+json, authentication, then
    the per-key rate limit (after auth: it limits per key). With the rate limiter of a worker of
    several, which maps the host's table once the app starts (worker_ctx)."""
    middlewares: list[Middleware] = [request_id_middleware, metrics_middleware(metrics), error_middleware,
                                     auth_middleware]
    host_limiter: HostRateLimiter | None = None
    if settings.rate_limit_per_s > 0 and settings.rate_limit_burst > 0:
        local = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        limiter: Limiter = local
        if worker is not None:
            limiter = host_limiter = HostRateLimiter(local)
        middlewares.append(rate_limit_middleware(limiter))
    origins = settings.allowed_origins()
    if origins:
        middlewares.insert(0, cors.cors_middleware(origins))
    return middlewares, host_limiter


def auth_failures(settings: Settings, metrics: Metrics) -> AuthFailures | None:
    """The per-address brake on failed authentications, with its counters; None when the settings turn
    it off."""
    if not (settings.auth_failure_rate_per_s > 0 and settings.auth_failure_burst > 0):
        return None
    failures = AuthFailures(RateLimiter(settings.auth_failure_rate_per_s, settings.auth_failure_burst,
                                        max_buckets=settings.auth_failure_max_addresses),
                            settings.trusted_networks(), hold_s=settings.auth_failure_hold_s,
                            max_held=settings.auth_failure_max_held)
    metrics.counter("tally_auth_failures_total", "Failed authentications", lambda: failures.failures)
    metrics.counter("tally_auth_refused_total", "Requests refused (429) after too many failed authentications",
                    lambda: failures.refused)
    return failures


def add_worker(app: web.Application, worker: WorkerPlace, host_limiter: HostRateLimiter | None) -> None:
    """A worker of `serve --workers N`: its index on every answer, and the host's limits table."""
    app[WORKER] = worker
    app.on_response_prepare.append(name_worker(worker.index))
    app.cleanup_ctx.append(worker_ctx(host_limiter))


def create_app(settings: Settings, clock: Clock = SYSTEM_CLOCK, worker: WorkerPlace | None = None
               ) -> web.Application:
    """The web application around the core; clock: what every part of it takes as now (tests move it);
    worker: set in a worker of `serve --workers N` (its per-key limits are the host's)."""
    metrics = Metrics()
    metrics.info("tally_event_loop_info", "The asyncio event loop serving this process (EVENT_LOOP)",
                 lambda: {"loop": loop_name()})
    watch_build(metrics)
    middlewares, host_limiter = middleware_chain(settings, metrics, worker)
    app = web.Application(middlewares=middlewares)
    app[SETTINGS] = settings
    app[CLOCK] = clock
    origins = settings.allowed_origins()
    if origins:
        app.on_response_prepare.append(cors.cors_headers(origins))
    app[METRICS] = metrics
    supervisor = Supervisor()
    app[SUPERVISOR] = supervisor
    metrics.counters("tally_background_task_restarts_total",
                     "Background tasks (listener, stream tail, projection runners...) restarted after a failure",
                     "task", supervisor.restarts)
    app.cleanup_ctx.append(supervisor_ctx)
    if worker is not None:
        add_worker(app, worker, host_limiter)
    watch_streams(metrics, app)
    failures = auth_failures(settings, metrics)
    if failures is not None:
        app[AUTH_FAILURES] = failures
    app[STREAM_TOKENS] = StreamTokens.from_settings(settings)
    app[LOG_VERIFICATION] = HeavyReads(WHOLE_LOG_VERIFICATIONS_AT_ONCE)
    app[STATE_REPLAY] = HeavyReads(STATE_REPLAYS_AT_ONCE)
    app.cleanup_ctx.append(signer_ctx)
    app.cleanup_ctx.append(core_ctx)
    app.cleanup_ctx.append(read_pools_ctx)
    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(housekeeping_ctx)
    app.cleanup_ctx.append(projections_ctx)
    app.cleanup_ctx.append(audit_ctx)
    app.cleanup_ctx.append(streaming.hub_ctx)
    app.on_shutdown.append(streaming.close_streams)
    app.cleanup_ctx.append(metrics_port_ctx(settings.metrics_port, None if worker is None else worker.index))
    for table in ROUTE_TABLES:
        add_routes(app, table)
    app[OPENAPI] = openapi.document_bytes(app)
    return app
