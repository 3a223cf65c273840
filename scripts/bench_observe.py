"""What bounds an append benchmark (`bench.py store --observe`): while a phase measures, sample what the
database's backends are doing, and how much CPU the client and the backends used.

Every SAMPLE_S the sampler reads pg_stat_activity for the bench database (on a connection of its own,
not counted) and tallies each backend as `state/wait_event` (active with no wait event: `active/CPU`;
waiting for its client mid-transaction: `idle in transaction/Client:ClientRead`; idle ones are left
out). Around the phase it reads the bench process's CPU time, the backends' CPU time from /proc (a
local server only; 0 otherwise), the database's commits (pg_stat_database) and the server's WAL
flushes (pg_stat_wal, whole cluster: other databases' work counts too)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

SAMPLE_S = 0.02
ACTIVITY_SQL = """
select pid, state, coalesce(wait_event_type || ':' || wait_event, 'CPU') as wait
from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() and backend_type = 'client backend'
"""
COUNTERS_SQL = """
select (select xact_commit from pg_stat_database where datname = current_database()) as commits,
       (select wal_sync from pg_stat_wal) as wal_syncs
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a local process, in seconds (0 when it cannot be read: gone, or not local)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Observation:
    seconds: float = 0.0
    client_cpu_s: float = 0.0
    backends_cpu_s: float = 0.0
    commits: int = 0
    wal_syncs: int = 0
    samples: int = 0
    waits: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        per_s = self.seconds or 1.0
        busy = Counter({name: count for name, count in self.waits.items() if not name.startswith("idle/")})
        total = sum(busy.values()) or 1
        top = ", ".join(f"{name} {count / total:.0%}" for name, count in busy.most_common(5))
        return (f"client CPU {self.client_cpu_s / per_s:.2f} cores, backends' CPU {self.backends_cpu_s / per_s:.2f}"
                f" cores, {self.commits / per_s:.0f} commits/s, {self.wal_syncs / per_s:.0f} WAL flushes/s"
                f" (cluster); {sum(busy.values()) / max(self.samples, 1):.2f} backends busy on average: {top}")


@contextlib.asynccontextmanager
async def observing(dsn: str) -> AsyncIterator[Observation]:
    """Observe the database behind dsn for the duration of the block."""
    observation = Observation()
    conn = await asyncpg.connect(dsn)
    try:
        pids = {row["pid"] for row in await conn.fetch(ACTIVITY_SQL)}
        before = await conn.fetchrow(COUNTERS_SQL)
        cpu_before = {pid: process_cpu_s(pid) for pid in pids}
        started, client_before = time.perf_counter(), time.process_time()

        async def sample() -> None:
            while True:
                rows = await conn.fetch(ACTIVITY_SQL)
                observation.samples += 1
                observation.waits.update(f"{row['state']}/{row['wait']}" for row in rows)
                await asyncio.sleep(SAMPLE_S)

        sampler = asyncio.create_task(sample())
        try:
            yield observation
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        observation.seconds = time.perf_counter() - started
        observation.client_cpu_s = time.process_time() - client_before
        observation.backends_cpu_s = sum(process_cpu_s(pid) - cpu for pid, cpu in cpu_before.items())
        after = await conn.fetchrow(COUNTERS_SQL)
        assert before is not None and after is not None
        observation.commits = after["commits"] - before["commits"]
        observation.wal_syncs = after["wal_syncs"] - before["wal_syncs"]
    finally:
        await conn.close()
