"""What /metrics reads from components that do not know about metrics: the pool, the stream hub, the build.

Wired by the composition root (backend/app.py) and the projections worker; read at scrape time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import asyncpg
from aiohttp import web

from backend.appkeys import HUB
from backend.http.metrics import SIZES, Metrics
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.store.read_pools import ReadPools, Replica
from backend.version import git_commit, version


def pool_waiting(pool: asyncpg.Pool) -> int:
    """Tasks waiting in acquire(): asyncpg keeps them as getters of its holder queue (no public API)."""
    queue = getattr(pool, "_queue", None)
    return len(getattr(queue, "_getters", ()))


def watch_pool(metrics: Metrics, pool: asyncpg.Pool) -> None:
    metrics.gauge("tally_db_pool_size", "Connections the pool holds open", pool.get_size)
    metrics.gauge("tally_db_pool_max_size", "Connections the pool may open (POOL_MAX_SIZE)", pool.get_max_size)
    metrics.gauge("tally_db_pool_in_use", "Pool connections acquired by a request or a task",
                  lambda: pool.get_size() - pool.get_idle_size())
    metrics.gauge("tally_db_pool_waiting", "Tasks waiting for a pool connection", lambda: pool_waiting(pool))


def watch_store(metrics: Metrics, store: EventStore, listener: Listener) -> None:
    """The log's head as this process saw it, LISTEN reconnects, and the append batches (serve and the
    projections worker alike: the worker appends the expiries)."""
    metrics.gauge("tally_event_store_head", "Highest position this process has seen", lambda: listener.head)
    metrics.counter("tally_listener_reconnects_total", "Times the LISTEN connection was re-established",
                    lambda: listener.reconnects)
    metrics.counter("tally_append_batches_total", "Append transactions committed", lambda: store.counters().batches)
    metrics.counter("tally_append_requests_total", "Append calls carried by those transactions",
                    lambda: store.counters().batched_requests)
    metrics.counter("tally_append_fenced_total", "Append transactions committed on the one-round-trip fenced path",
                    lambda: store.counters().fenced)
    metrics.counter("tally_append_fence_misses_total",
                    "Fenced attempts that found one of their streams moved by another writer (then retried or "
                    "took the locked path)",
                    lambda: store.counters().fence_misses)
    metrics.counter("tally_append_fenced_shifted_total",
                    "Fenced appends that went in further on than planned (the log had moved, their streams had not)",
                    lambda: store.counters().fenced_shifted)
    metrics.counters("tally_append_locked_total",
                     "Append batches that took the locked path, by why the fenced one could not serve them",
                     "reason", lambda: store.counters().locked_paths)
    metrics.counter("tally_stream_tail_queries_total",
                    "Queries that read streams' new events for commands (the caches could not be trusted)",
                    lambda: store.counters().tail_queries)
    durations = metrics.histogram(
        "tally_append_batch_duration_seconds",
        "Append transactions from start to commit (the disk flush included), as this process saw them")
    sizes = metrics.histogram("tally_append_batch_size", "Append calls per committed transaction", SIZES)

    def batch_done(seconds: float, requests: int) -> None:
        durations.observe(seconds)
        sizes.observe(requests)

    store.observe_batches(batch_done)


def watch_replicas(metrics: Metrics, pools: ReadPools) -> None:
    """Each read replica (labelled host:port/database, never with a password): in use or not, its lag as
    the last check measured it (absent while unknown), the reads it served and those the primary took
    over after it failed."""
    def gauge(read: Callable[[Replica], float | None]) -> Callable[[], Iterable[tuple[tuple[str, ...], float]]]:
        return lambda: [((r.label,), value) for r in pools.replicas if (value := read(r)) is not None]

    metrics.labelled_gauges("tally_replica_in_use", "1 while the read replica serves reads", ("replica",),
                            gauge(lambda r: float(r.in_use)))
    metrics.labelled_gauges("tally_replica_lag_seconds", "Age of the oldest event the replica had not replayed "
                            "at the last check (0: none)", ("replica",), gauge(lambda r: r.lag_s))
    metrics.labelled_gauges("tally_replica_lag_events", "Log events the replica had not replayed at the last check",
                            ("replica",), gauge(lambda r: r.lag_events))
    metrics.counters("tally_replica_reads_total", "Reads served by the replica", "replica",
                     lambda: {r.label: r.reads for r in pools.replicas})
    metrics.counters("tally_replica_fallbacks_total", "Reads that failed on the replica and were served by the "
                     "primary", "replica", lambda: {r.label: r.fallbacks for r in pools.replicas})


def watch_streams(metrics: Metrics, app: web.Application) -> None:
    """Open streams per kind (log: /v1/stream and its filtered forms; dashboard: the stats stream)."""
    def subscribers() -> Iterable[tuple[tuple[str, ...], float]]:
        hub = app.get(HUB)
        if hub is None:
            return []
        return [(("log",), hub.log_streams), (("dashboard",), hub.streams - hub.log_streams)]

    metrics.labelled_gauges("tally_stream_subscribers", "Open event streams by kind", ("kind",), subscribers)
    metrics.counter("tally_stream_evictions_total",
                    "Streams closed because their client stopped reading (the hub's stall watchdog)",
                    lambda: hub.evictions if (hub := app.get(HUB)) is not None else 0)


def watch_build(metrics: Metrics) -> None:
    """tally_build_info{version, commit}: the commit is read once, off the event loop, at the first scrape."""
    build = {"version": version(), "commit": ""}
    pending = [True]

    async def read_commit() -> None:
        if pending:
            commit = await asyncio.to_thread(git_commit)
            build["commit"] = commit or ""
            pending.clear()

    metrics.before_scrape.append(read_commit)
    metrics.info("tally_build_info", "This build's version and git commit (empty when not run from a checkout)",
                 lambda: build)
