"""Prometheus metrics: request counts and latencies per route, plus gauges read from live components.

Counters live in a Metrics object on the app (no module-level registry), rendered in the Prometheus
text exposition format at GET /metrics.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.count += 1
        self.total += seconds

    def render(self, name: str, labels: str = "") -> list[str]:
        """The exposition lines: cumulative buckets, sum and count."""
        lines = []
        cumulative = 0
        prefix = f"{labels}," if labels else ""
        for bound, count in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{prefix}le="{le}"}} {cumulative}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {self.total:.6f}")
        lines.append(f"{name}_count{suffix} {self.count}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.infos: dict[str, tuple[str, Callable[[], dict[str, str]]]] = {}
        self.histograms: dict[str, tuple[str, Histogram]] = {}
        self.families: dict[str, tuple[str, str, Callable[[], Mapping[str, float]]]] = {}

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a value read at scrape time (e.g. the store's head, a batcher's counters)."""
        self.gauges[name] = (help_text, read)

    def histogram(self, name: str, help_text: str) -> Histogram:
        """Register a histogram (seconds, the BUCKETS bounds) that a component observes into."""
        self.histograms[name] = (help_text, Histogram())
        return self.histograms[name][1]

    def counters(self, name: str, help_text: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        """Register a counter per value of one label, read at scrape time (e.g. restarts per task)."""
        self.families[name] = (help_text, label, read)

    def info(self, name: str, help_text: str, read: Callable[[], dict[str, str]]) -> None:
        """Register a constant-1 gauge whose labels describe the process (read at scrape time)."""
        self.infos[name] = (help_text, read)

    def render(self) -> str:
        lines = ["# HELP tally_http_requests_total HTTP requests by route and status",
                 "# TYPE tally_http_requests_total counter"]
        for (method, route, status), count in sorted(self.requests.items()):
            lines.append(f'tally_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {count}')
        lines += ["# HELP tally_http_request_duration_seconds HTTP request latency by route",
                  "# TYPE tally_http_request_duration_seconds histogram"]
        for route, hist in sorted(self.latency.items()):
            lines += hist.render("tally_http_request_duration_seconds", f'route="{route}"')
        for name, (help_text, hist) in sorted(self.histograms.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.render(name)]
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read()}"]
        for name, (help_text, label, read_family) in sorted(self.families.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines += [f'{name}{{{label}="{value}"}} {count}' for value, count in sorted(read_family().items())]
        for name, (help_text, read_labels) in sorted(self.infos.items()):
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(read_labels().items()))
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} 1"]
        return "\n".join(lines) + "\n"


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def metrics_middleware(metrics: Metrics) -> Middleware:
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
            route = route_of(request)
            metrics.requests[(request.method, route, status)] += 1
            metrics.latency[route].observe(time.perf_counter() - started)

    return middleware
