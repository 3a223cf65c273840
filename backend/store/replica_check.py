"""The replicas' health: a supervised task (`replica-check`) that measures each replica's lag every
REPLICA_CHECK_S and puts it in or out of use for reads (backend/store/read_pools.py).

Lag is measured in the log's own terms: the replica's head (its highest replayed position) against
the primary's, and in seconds as the age, on the primary, of the oldest event the replica has not
replayed (0 when it has them all), like a projection's lag. A replica is in use while it answers and
lags by at most REPLICA_MAX_LAG_S; one that does not answer, or whose lag cannot be measured (the
primary is down), is out of use until a check finds it back.
"""

from __future__ import annotations

import asyncio
import logging

from backend.db import describe
from backend.store.read_pools import ReadPools, Replica
from backend.store.reads import HEAD_SQL

log = logging.getLogger(__name__)

TASK = "replica-check"

PRIMARY_LAG_SQL = """
select (select coalesce(max(position), 0) from events) as head,
       (select extract(epoch from clock_timestamp() - recorded_at)::float8 from events where position = $1 + 1) as age
"""


class ReplicaChecker:
    def __init__(self, pools: ReadPools, *, max_lag_s: float, timeout_s: float) -> None:
        self.pools = pools
        self.max_lag_s = max_lag_s
        self.timeout_s = timeout_s

    async def run(self, interval_s: float) -> None:
        """Check every interval_s, until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(interval_s)

    async def check(self) -> None:
        """Measure every replica (at once) and set whether it is in use; never raises for a replica."""
        await asyncio.gather(*(self._check(replica) for replica in self.pools.replicas))

    async def _check(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                head = int(await replica.pool.fetchval(HEAD_SQL))
                row = await self.pools.primary.fetchrow(PRIMARY_LAG_SQL, head)
        except Exception as exc:  # any failure (down, misconfigured, no events table) keeps it out
            self._out(replica, describe(exc))
            return
        assert row is not None
        replica.head = head
        replica.lag_events = max(0, int(row["head"]) - head)
        replica.lag_s = max(0.0, float(row["age"])) if row["age"] is not None else 0.0
        if replica.lag_s > self.max_lag_s:
            self._out(replica, f"lags {replica.lag_s:.3g} s (over REPLICA_MAX_LAG_S, {self.max_lag_s:g} s)")
            return
        if not replica.in_use:
            log.info("read replica in use", extra={"replica": replica.label, "lag_s": round(replica.lag_s, 3)})
        replica.in_use = True
        replica.last_error = None

    @staticmethod
    def _out(replica: Replica, reason: str) -> None:
        if replica.in_use or replica.last_error is None:
            log.warning("read replica out of use, reads go to the primary",
                        extra={"replica": replica.label, "reason": reason})
        replica.in_use = False
        replica.last_error = reason
        if reason.startswith("lags"):
            return
        replica.head = replica.lag_events = None
        replica.lag_s = None
