"""Prometheus metrics: one prometheus-client CollectorRegistry per app (no global registry).

Per request the middleware only bumps one small Histogram kept in a dict (as cheap as a counter);
prometheus-client's own Counter and Histogram take a lock and walk the buckets on every observation.
Everything else is read from the live components when Prometheus scrapes, by custom collectors that
yield metric families: nothing mutates a gauge behind the components' backs. A few values need the
database (projection lag): the /metrics handler awaits the `before_scrape` refreshers first.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SIZES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Any other method is counted as "other": a client cannot add series by inventing methods."""

Kind = Literal["counter", "gauge"]
Labelled = Callable[[], Iterable[tuple[tuple[str, ...], float]]]
Family = CounterMetricFamily | GaugeMetricFamily

log = logging.getLogger(__name__)


class Histogram:
    """Counts per bucket (not cumulative), their sum and count: observe() is a bisect and three adds."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = SECONDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.total += value

    def add(self, other: Histogram) -> None:
        for i, count in enumerate(other.counts):
            self.counts[i] += count
        self.count += other.count
        self.total += other.total

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative, as the exposition format wants them, +Inf last."""
        cumulative = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        return result


class RequestCollector(Collector):
    """tally_http_requests_total by method, route and exact status (a 503 rate needs the code) and
    tally_http_request_duration_seconds by method, route and status class (2xx...), both from the one
    histogram per (method, route, status) that the middleware observes into."""

    def __init__(self, requests: Mapping[tuple[str, str, int], Histogram]) -> None:
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        counts = CounterMetricFamily("tally_http_requests", "HTTP requests by method, route and status",
                                     labels=("method", "route", "status"))
        by_class: dict[tuple[str, str, str], Histogram] = {}
        for (method, route, status), hist in sorted(self.requests.items()):
            counts.add_metric((method, route, str(status)), hist.count)
            key = (method, route, f"{status // 100}xx")
            by_class.setdefault(key, Histogram()).add(hist)
        latency = HistogramMetricFamily("tally_http_request_duration_seconds",
                                        "HTTP request latency by method, route and status class",
                                        labels=("method", "route", "status_class"))
        for labels, hist in by_class.items():
            latency.add_metric(labels, hist.buckets(), hist.total)
        yield counts
        yield latency


class LiveCollector(Collector):
    """Values owned by components (a batcher's count, the listener's reconnects...), read at scrape time."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Kind, str, Callable[[], float]]] = {}
        self.labelled: dict[str, tuple[Kind, str, tuple[str, ...], Labelled]] = {}
        self.histograms: dict[str, tuple[str, Histogram]] = {}
        self.infos: dict[str, tuple[str, Callable[[], Mapping[str, str]]]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (kind, help_text, read) in sorted(self.values.items()):
            family = family_of(kind, name, help_text, ())
            family.add_metric((), read())
            yield family
        for name, (kind, help_text, labels, read_all) in sorted(self.labelled.items()):
            family = family_of(kind, name, help_text, labels)
            for values, value in read_all():
                family.add_metric(values, value)
            yield family
        for name, (help_text, hist) in sorted(self.histograms.items()):
            histogram = HistogramMetricFamily(name, help_text)
            histogram.add_metric((), hist.buckets(), hist.total)
            yield histogram
        for name, (help_text, read_labels) in sorted(self.infos.items()):
            described = sorted(read_labels().items())
            info = GaugeMetricFamily(name, help_text, labels=[key for key, _ in described])
            info.add_metric([value for _, value in described], 1)
            yield info


def family_of(kind: Kind, name: str, help_text: str, labels: tuple[str, ...]) -> Family:
    if kind == "counter":
        if not name.endswith("_total"):
            raise ValueError(f"a counter's name ends in _total: {name}")
        return CounterMetricFamily(name, help_text, labels=labels)
    return GaugeMetricFamily(name, help_text, labels=labels)


class Metrics:
    """This process's metrics: its own registry, the request histograms and the live values."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests: defaultdict[tuple[str, str, int], Histogram] = defaultdict(Histogram)
        self.live = LiveCollector()
        self.before_scrape: list[Callable[[], Awaitable[None]]] = []
        """Refreshers that need I/O (the database), awaited by the /metrics handler before rendering."""
        self.registry.register(RequestCollector(self.requests))
        self.registry.register(self.live)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def counter(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A count a component keeps (name ending in _total), read at scrape time."""
        family_of("counter", name, help_text, ())
        self.live.values[name] = ("counter", help_text, read)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A current value (the store's head, a pool's size), read at scrape time."""
        self.live.values[name] = ("gauge", help_text, read)

    def counters(self, name: str, help_text: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        """A count per value of one label (e.g. restarts per task), read at scrape time."""
        family_of("counter", name, help_text, ())
        self.live.labelled[name] = ("counter", help_text, (label,),
                                    lambda: (((key,), value) for key, value in sorted(read().items())))

    def labelled_gauges(self, name: str, help_text: str, labels: tuple[str, ...],
                        read: Labelled) -> None:
        """Current values per label values (e.g. stream subscribers per kind), read at scrape time."""
        self.live.labelled[name] = ("gauge", help_text, labels, read)

    def info(self, name: str, help_text: str, read: Callable[[], Mapping[str, str]]) -> None:
        """A constant-1 gauge whose labels describe the process (read at scrape time)."""
        self.live.infos[name] = (help_text, read)

    def histogram(self, name: str, help_text: str, bounds: tuple[float, ...] = SECONDS) -> Histogram:
        """A histogram a component observes into (seconds by default)."""
        self.live.histograms[name] = (help_text, Histogram(bounds))
        return self.live.histograms[name][1]

    async def render(self, timeout_s: float) -> bytes:
        """Refresh what needs I/O (each refresher within timeout_s; one that fails or times out leaves
        its metrics as it last saw them, or says so itself), then the exposition text."""
        for refresh in self.before_scrape:
            try:
                async with asyncio.timeout(timeout_s):
                    await refresh()
            except Exception as exc:  # a scrape must answer while the database is away
                log.debug("metrics refresh failed", extra={"error": repr(exc)})
        return generate_latest(self.registry)


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def metrics_middleware(metrics: Metrics) -> Middleware:
    requests = metrics.requests

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            method = request.method
            requests[(method if method in METHODS else "other", route_of(request), status)].observe(
                time.perf_counter() - started)

    return middleware
