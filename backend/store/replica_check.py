"""The replicas' health: a supervised task (`replica-check`) that measures each replica's lag every
REPLICA_CHECK_S and puts it in or out of use for reads (backend/store/read_pools.py). Each replica is
checked on its own clock: one that does not answer holds its check for CONNECT_TIMEOUT_S, and would
otherwise hold up every other replica's with it.

Lag is measured in the log's own terms: the replica's head (its highest replayed position) against
the primary's, and in seconds as the age, on the primary, of the oldest event the replica has not
replayed (0 when it has them all), like a projection's lag. A replica is in use while it answers and
lags by at most REPLICA_MAX_LAG_S; one that does not answer, or whose lag cannot be measured (the
primary is down), is out of use until a check finds it back.

A replica that does not answer its check within CONNECT_TIMEOUT_S, or cannot be reached, is cut off
(`ReadPools.cut_off`): the reads still waiting on its connections go to the primary at once. The check
itself stops waiting at that bound, whatever the query it leaves behind does.

A replica is also checked to be one of the primary's: a hot standby whose newest event is the primary's
event at that position. A READ_DATABASE_URL naming the primary itself, the wrong database, a copy
restored elsewhere or a promoted standby is never read from, though its own head may look current.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from backend.db import describe, is_unavailable
from backend.store.read_pools import ReadPools, Replica, by_deadline

log = logging.getLogger(__name__)

TASK = "replica-check"

REPLICA_HEAD_SQL = """
select pg_is_in_recovery() as standby, h.head, e.event_id
from (select coalesce(max(position), 0) as head from events) as h
left join events as e on e.position = h.head
"""

PRIMARY_LAG_SQL = """
select h.head, e.event_id as event_at_head,
       (select extract(epoch from clock_timestamp() - recorded_at)::float8 from events where position = $1 + 1) as age,
       (select event_id from events where position = $1) as event_id
from (select coalesce(max(position), 0) as head from events) as h
left join events as e on e.position = h.head
"""

EVENT_ID_SQL = "select event_id from events where position = $1"


class NotAReplica(Exception):
    """The server is not a hot standby, or its log is not a prefix of the primary's."""


class Silent(Exception):
    """The replica did not answer its check: unreachable, down, or hung."""


class ReplicaChecker:
    def __init__(self, pools: ReadPools, *, max_lag_s: float, timeout_s: float) -> None:
        self.pools = pools
        self.max_lag_s = max_lag_s
        self.timeout_s = timeout_s

    async def run(self, interval_s: float) -> None:
        """Check each replica every interval_s, until cancelled; the first checks start at once."""
        await asyncio.gather(*(self._watch(replica, interval_s) for replica in self.pools.replicas))

    async def _watch(self, replica: Replica, interval_s: float) -> None:
        while True:
            await self._check(replica)
            await asyncio.sleep(interval_s)

    async def check(self) -> None:
        """Measure every replica (at once) and set whether it is in use; never raises for a replica."""
        await asyncio.gather(*(self._check(replica) for replica in self.pools.replicas))

    async def _check(self, replica: Replica) -> None:
        try:
            head, row = await self._measure(replica)
        except NotAReplica as exc:
            self._out(replica, f"not a replica of the primary: {exc}")
            return
        except Silent as exc:
            self._out(replica, str(exc))
            await self.pools.cut_off(replica)
            return
        except Exception as exc:  # any failure (down, misconfigured, no events table) keeps it out
            self._out(replica, describe(exc))
            return
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

    async def _measure(self, replica: Replica) -> tuple[int, asyncpg.Record]:
        """The replica's head and the primary's lag row at it, once the replica's log is known to be a
        prefix of the primary's: the event at a position they both have is the same (event ids are random)."""
        seen = await self._ask(replica, REPLICA_HEAD_SQL)
        assert seen is not None
        if not seen["standby"]:
            raise NotAReplica("not a hot standby (pg_is_in_recovery() is false)")
        head = int(seen["head"])
        async with asyncio.timeout(self.timeout_s):
            row = await self.pools.primary.fetchrow(PRIMARY_LAG_SQL, head)
        assert row is not None
        position, ours, theirs = head, seen["event_id"], row["event_id"]
        if head > row["head"]:
            # a standby can show a commit before the primary's sessions do (synchronous replication waits
            # for the standby first): compare at the primary's head instead
            position, theirs = int(row["head"]), row["event_at_head"]
            if position == 0:
                raise NotAReplica(f"it has {head} events, the primary none")
            found = await self._ask(replica, EVENT_ID_SQL, position)
            ours = found["event_id"] if found is not None else None
        if ours != theirs:
            raise NotAReplica(f"position {position} holds another event than on the primary")
        return head, row

    async def _ask(self, replica: Replica, sql: str, *args: object) -> asyncpg.Record | None:
        """A row from the replica, within timeout_s; Silent when it cannot be reached or does not answer
        (its connections hang). A query left unanswered is abandoned, not waited for: cancelling it would
        wait for the cancel request's own connection to the hung server, CONNECT_TIMEOUT_S more."""
        async def fetch() -> tuple[asyncpg.Record | None]:
            return (await replica.pool.fetchrow(sql, *args),)

        try:
            answered = await by_deadline(asyncio.get_running_loop().time() + self.timeout_s, fetch())
        except Exception as exc:
            if is_unavailable(exc):
                raise Silent(describe(exc)) from exc
            raise
        if answered is None:
            raise Silent("TimeoutError")
        return answered[0]

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
