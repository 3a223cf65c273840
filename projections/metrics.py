"""Each projection's lag (events and seconds) and state as Prometheus metrics, for `serve` and the worker.

The status needs the database, so refresh() reads it before each scrape (Metrics.before_scrape) and
collect() yields what it last read. tally_projection_status_up says whether that read succeeded: a
scrape during a database outage keeps no stale lag behind a healthy-looking 1.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backend.store.reads import Executor
from projections.status import FAILED, RUNNING, STOPPED, ProjectionStatus, status

STATES = (RUNNING, STOPPED, FAILED)


class ProjectionMetrics(Collector):
    def __init__(self, db: Executor, names: list[str]) -> None:
        self.db = db
        self.names = names
        self.seen: list[ProjectionStatus] = []
        self.up = False

    async def refresh(self) -> None:
        self.up = False
        self.seen = await status(self.db, self.names)
        self.up = True

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tally_projection_status_up",
                               "1 when this scrape read the projections' status from the database")
        up.add_metric((), 1 if self.up else 0)
        yield up
        if not self.up:
            return
        events = GaugeMetricFamily("tally_projection_lag_events", "Events in the log a projection has not applied",
                                   labels=("projection",))
        seconds = GaugeMetricFamily("tally_projection_lag_seconds",
                                    "Age of the oldest event a projection has not applied (0 when caught up)",
                                    labels=("projection",))
        state = GaugeMetricFamily("tally_projection_state",
                                  "1 for a projection's current state (running: some process leads it; stopped: "
                                  "none does; failed: a failure is recorded)", labels=("projection", "state"))
        for seen in self.seen:
            events.add_metric((seen.name,), seen.lag_events)
            seconds.add_metric((seen.name,), seen.lag_s)
            for name in STATES:
                state.add_metric((seen.name, name), 1 if seen.state == name else 0)
        yield events
        yield seconds
        yield state
