"""Projection status as every process sees it: checkpoint, head, lag, state, last failure.

state is `failed` while a failure is recorded (the leader keeps retrying it), else `running` while
some process holds the projection's leader lock, else `stopped`. Lag in seconds is the age of the
oldest event the projection has not yet considered (0 when caught up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from backend.store.reads import Executor
from projections import leader

STATUS_SQL = """
with head as (select coalesce(max(position), 0) as head from events)
select n.name, coalesce(c.position, 0) as checkpoint, head.head, c.updated_at, c.error, c.failed_position,
       c.failed_at, coalesce(c.failures, 0) as failures,
       coalesce(extract(epoch from clock_timestamp() - e.recorded_at), 0)::float8 as lag_s
from unnest($1::text[]) with ordinality as n(name, ord)
cross join head
left join projection_checkpoints c on c.name = n.name
left join events e on e.position = coalesce(c.position, 0) + 1
order by n.ord
"""

FAILED, RUNNING, STOPPED = "failed", "running", "stopped"


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    name: str
    checkpoint: int
    head: int
    lag_events: int
    lag_s: float
    state: str
    leader_pid: int | None
    leader: str | None
    """The leader session's application_name: tally-projection-<name>-<OS pid of its process>."""
    rebuilding: bool
    error: str | None
    failed_position: int | None
    failed_at: datetime | None
    failures: int
    updated_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("failed_at", "updated_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


async def status(db: Executor, names: list[str]) -> list[ProjectionStatus]:
    rows = await db.fetch(STATUS_SQL, names)
    leaders = await leader.holders(db, leader.LEADER, names)
    rebuilds = await leader.holders(db, leader.REBUILD, names)
    result = []
    for row in rows:
        name = row["name"]
        state = FAILED if row["error"] else RUNNING if name in leaders else STOPPED
        result.append(ProjectionStatus(
            name=name,
            checkpoint=row["checkpoint"],
            head=row["head"],
            lag_events=max(0, row["head"] - row["checkpoint"]),
            lag_s=round(row["lag_s"], 3),
            state=state,
            leader_pid=leaders[name][0] if name in leaders else None,
            leader=leaders[name][1] if name in leaders else None,
            rebuilding=name in rebuilds,
            error=row["error"],
            failed_position=row["failed_position"],
            failed_at=row["failed_at"],
            failures=row["failures"],
            updated_at=row["updated_at"],
        ))
    return result
