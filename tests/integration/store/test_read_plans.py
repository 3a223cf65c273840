"""The store's per-command reads stay index lookups, whatever plan PostgreSQL caches for them.

asyncpg prepares every statement, and after five executions PostgreSQL may switch a prepared
statement to its generic plan, made without the parameters' values: a read that is an index lookup
with the values can become a scan of the whole log without them, and then costs more with every
event appended. Each read here is planned generically (`plan_cache_mode = force_generic_plan`) over a
log large enough for a scan to look cheap to the planner, and must not scan the tables that grow with
the log.
"""

from __future__ import annotations

import asyncpg

from backend.store.append import STATE_SQL
from backend.store.coalesce import TAILS_SQL, VERSIONS_SQL
from backend.store.event_store import EventStore
from backend.store.events import NO_STREAM, NewEvent, Write
from backend.store.idempotency import LOOKUP_SQL, IdempotencyClaim

STREAMS = 40
EVENTS_PER_STREAM = 100
IDEMPOTENCY_RECORDS = 20_000
GROWING = ("events", "idempotency_keys")


async def fill(pool: asyncpg.Pool) -> None:
    """STREAMS streams of EVENTS_PER_STREAM events, one idempotency record each and many more records
    (written directly: only their number matters to the planner), then fresh statistics."""
    store = EventStore(pool)
    streams = [f"plan-{i}" for i in range(STREAMS)]
    try:
        for i, stream in enumerate(streams):
            events = [NewEvent("Thing", {"n": n}) for n in range(EVENTS_PER_STREAM)]
            await store.append([Write(stream, NO_STREAM, events)],
                               IdempotencyClaim("plans", f"key-{i}", b"fp", b"outcome"))
    finally:
        await store.close()
    await pool.execute("""
        insert into idempotency_keys (scope, key, fingerprint, outcome)
        select 'other', 'key-' || n, '\\x00', '\\x00' from generate_series(1, $1) as n
    """, IDEMPOTENCY_RECORDS)
    await pool.execute("analyze events; analyze idempotency_keys")


def scans_of_growing_tables(plan: list[str]) -> list[str]:
    scans = [line.strip() for line in plan if "Seq Scan on " in line]
    return [scan for scan in scans if scan.split("Seq Scan on ")[1].split()[0] in GROWING]


READS = {
    "tails": (TAILS_SQL, "'{plan-3,plan-7}'::text[], '{98,99}'::int[]"),
    "versions": (VERSIONS_SQL, "'{plan-3,plan-7}'::text[]"),
    "state": (STATE_SQL, "'{plan-3}'::text[], '{}'::uuid[], '{plans}'::text[], '{key-3}'::text[]"),
    "lookup": (LOOKUP_SQL, "'{plans}'::text[], '{key-3}'::text[]"),
}


async def test_every_per_command_read_walks_an_index_in_its_generic_plan(own_pool: asyncpg.Pool) -> None:
    await fill(own_pool)
    scanning: dict[str, str] = {}
    async with own_pool.acquire() as conn:
        await conn.execute("set plan_cache_mode = force_generic_plan")
        for name, (sql, args) in READS.items():
            await conn.execute(f"prepare {name} as {sql}")
            plan = [row[0] for row in await conn.fetch(f"explain execute {name}({args})")]
            await conn.execute(f"deallocate {name}")
            if scans_of_growing_tables(plan):
                scanning[name] = "\n".join(plan)
        await conn.execute("reset plan_cache_mode")
    assert not scanning, "\n\n".join(f"{name}:\n{plan}" for name, plan in scanning.items())
