"""CPU per event folded into the Merkle tree, of PostgreSQL and of this process: tally_merkle_fold vs a fold in Python.

The tree folder runs in the serving process, folding about once a second whatever arrived meanwhile.
Since migration 0011 the database hashes the leaves and nodes (`tally_merkle_fold`); before, the
process read each event's hash, hashed in Python and sent the nodes back as JSON. `python` here is
that earlier fold, kept only as the reference (the same statements and loop, in one transaction per
batch). Both fold the same synthetic log (N events inserted straight into `events`, immutability
triggers off: the bench's own database) in batches of B events; each reports the CPU seconds of the
PostgreSQL backend that folds (utime + stime from /proc, so the server must run on this machine) and
of this process, per event, and checks that both build the same root. CPU, not wall time: the
figures hold on a busy machine better than rates do, but they are still times.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from bench_store import chosen_server, fresh_database

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.audit import tree_store  # noqa: E402
from backend.audit.merkle import Frontier, leaf_hash  # noqa: E402
from backend.store.migrate import migrate  # noqa: E402

FILL_SQL = """
insert into events (position, stream_id, version, type, data, event_id, recorded_at, hash)
select g, 'bench-' || g, 1, 'Bench', '{}', gen_random_uuid(), now(), sha256(int8send(g))
from generate_series(1, $1::bigint) as g
"""
# The fold before migration 0011 (backend/audit/tree_store.py then), for comparison only.
LOCK_SIZE_SQL = "select tree_size from merkle_state for update"
EVENTS_SQL = "select position, hash from events where position > $1 order by position limit $2"
INSERT_SQL = """
insert into merkle_nodes (level, index, hash)
select (n->>0)::smallint, (n->>1)::bigint, decode(n->>2, 'hex') from jsonb_array_elements($1::text::jsonb) as n
"""
ADVANCE_SQL = "update merkle_state set tree_size = $1, updated_at = now()"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL server (on this machine) to create the bench databases on")
    parser.add_argument("--events", type=int, default=20_000, help="events folded (default 20,000)")
    parser.add_argument("--batches", default="50,1000",
                        help="events per fold, comma-separated (default 50,1000: about one second of "
                             "light and of heavy load)")
    parser.add_argument("--impls", default="sql,python", help="sql (tally_merkle_fold), python (the earlier fold)")
    parser.add_argument("--quick", action="store_true", help="5,000 events")


def backend_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)


async def python_fold(conn: asyncpg.Connection[Any], frontier: Frontier | None, limit: int) -> Frontier:
    async with conn.transaction():
        size = int(await conn.fetchval(LOCK_SIZE_SQL))
        if frontier is None:
            frontier = Frontier(size)  # a fresh database: size 0, nothing to load
        nodes: list[tuple[int, int, str]] = []
        for position, event_hash in await conn.fetch(EVENTS_SQL, size, limit):
            for level, index, value in frontier.push(leaf_hash(position, event_hash)):
                nodes.append((level, index, value.hex()))
        if nodes:
            await conn.execute(INSERT_SQL, orjson.dumps(nodes).decode())
            await conn.execute(ADVANCE_SQL, frontier.size)
    return frontier


async def one(dsn: str, impl: str, events: int, batch: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute("alter table events disable trigger user")
        await conn.execute(FILL_SQL, events)
        await conn.execute("analyze")
        pid = await conn.fetchval("select pg_backend_pid()")
        server, client, wall = backend_cpu_s(pid), time.process_time(), time.perf_counter()
        if impl == "sql":
            size = 0
            while size < events:
                size, _ = await tree_store.fold(conn, batch)
        else:
            frontier: Frontier | None = None
            while frontier is None or frontier.size < events:
                frontier = await python_fold(conn, frontier, batch)
        server, client = backend_cpu_s(pid) - server, time.process_time() - client
        wall = time.perf_counter() - wall
        root = await tree_store.root(conn, events)
    finally:
        await conn.close()
    return {"impl": impl, "batch": batch, "postgres_us_per_event": round(server / events * 1e6, 1),
            "client_us_per_event": round(client / events * 1e6, 1),
            "wall_us_per_event": round(wall / events * 1e6, 1), "root": root.hex()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    events = 5_000 if args.quick else args.events
    results = []
    async with chosen_server(args.dsn) as server:
        for batch in (int(b) for b in args.batches.split(",")):
            for impl in args.impls.split(","):
                async with fresh_database(server, "fold") as dsn:
                    found = await one(dsn, impl, events, batch)
                results.append(found)
                print(f"{impl:6} batches of {batch:5}: PostgreSQL {found['postgres_us_per_event']:6.1f} µs, "
                      f"this process {found['client_us_per_event']:6.1f} µs, wall {found['wall_us_per_event']:6.1f} µs "
                      f"per event")
    roots = {r["root"] for r in results}
    if len(roots) != 1:
        raise SystemExit(f"the folds disagree: roots {sorted(roots)}")
    print(f"{events} events; every fold gave root {roots.pop()[:16]}…")
    return {"bench": "fold", "events": events, "results": [{k: v for k, v in r.items() if k != "root"}
                                                           for r in results]}
