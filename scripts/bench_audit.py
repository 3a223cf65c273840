"""Hash-chain verification rate of the whole log, from the database and from an export file (events/s).

Workload: N events (default 200,000) over S wallet streams (default 20,000), small realistic payloads
(WalletOpened, then credits and debits with an amount, a reference and occurred_at; metadata with an
actor, a request id and the schema version), appended in large batches through Tally's EventStore into
a fresh database, then ANALYZE. The log is exported once to an NDJSON file (export rate reported too).
Then rounds alternate `database` (backend.audit.verify.verify_database over one connection) and
`export` (verify the file with no database), each verifying every chain; the report shows medians.

The Merkle tree (docs/AUDIT.md): `tree` builds it from the export file (read, parse, leaf hashes, RFC
9162 root) as `audit verify --checkpoint` does, in rounds; `fold` folds the stored tree in the database
once, as the background folder does (its root must equal the export's); then a `serve` process (no
projections) answers inclusion and consistency proofs at the full size for random positions from
CONNECTIONS concurrent clients, each proof checked against the export's root.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
from bench_http import admin_token, cpu_seconds, free_port, serve_env, wait_ready
from bench_store import analyze, chosen_server, connected, describe_server, fresh_database, migrated

from backend.audit import tree_store
from backend.audit.auditor import leaf_of
from backend.audit.export import export_pages, read_export
from backend.audit.merkle import Frontier, verify_consistency, verify_inclusion
from backend.audit.verify import Report, verify, verify_database
from backend.db import pool_options
from backend.store.event_store import EventStore
from backend.store.events import NewEvent, Write

TARGET = 100_000
PROOF_TARGET = 1_000
ROOT = Path(__file__).resolve().parent.parent
WRITES_PER_APPEND = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="admin DSN of the server (default: $BENCH_DATABASE_URL, local 5432, embedded)")
    parser.add_argument("--events", type=int, default=200_000, help="events in the log (default 200,000)")
    parser.add_argument("--streams", type=int, default=20_000, help="wallet streams (default 20,000)")
    parser.add_argument("--rounds", type=int, help="rounds of database, export (default 3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="one round: under a minute in all")
    parser.add_argument("--connections", type=int, default=32, help="concurrent proof clients (default 32)")
    parser.add_argument("--seconds", type=float, help="seconds of each proof kind (default 8; --quick 3)")


# ---------------------------------------------------------------- the log


def stream_events(rng: random.Random, number: int, version: int, at: datetime) -> NewEvent:
    occurred_at = (at + timedelta(milliseconds=version)).isoformat()
    meta = {"actor": f"key-{rng.randrange(500)}", "request_id": f"{rng.getrandbits(64):016x}", "schema_version": 1}
    if version == 1:
        data: dict[str, Any] = {"owner": f"user-{number % 5000}", "currency": "USD", "occurred_at": occurred_at}
        return NewEvent("WalletOpened", data, meta)
    kind = "WalletCredited" if version % 3 else "WalletDebited"
    data = {"amount": rng.randrange(1, 100_000), "reference": f"order-{rng.getrandbits(40):010x}",
            "occurred_at": occurred_at}
    return NewEvent(kind, data, meta)


async def fill(dsn: str, events: int, streams: int) -> float:
    """Append `events` round-robin over `streams` wallets (each append: up to 2000 one-event writes)."""
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4, **pool_options())
    assert pool is not None
    store = EventStore(pool, max_batch_events=WRITES_PER_APPEND * 2)
    rng = random.Random(7)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    started = time.perf_counter()
    try:
        calls = []
        for start in range(0, events, WRITES_PER_APPEND):
            writes = []
            for n in range(start, min(start + WRITES_PER_APPEND, events)):
                number, version = n % streams, n // streams + 1
                writes.append(Write(f"wallet-{number:08d}", version - 1, [stream_events(rng, number, version, at)]))
            calls.append(store.append(writes))
            if len(calls) == 4:
                await asyncio.gather(*calls)
                calls = []
        await asyncio.gather(*calls)
    finally:
        await store.close()
        await pool.close()
    return events / (time.perf_counter() - started)


async def export_to(dsn: str, path: Path) -> float:
    async with connected(dsn) as conn:
        started = time.perf_counter()
        count = 0
        with path.open("wb") as out:
            async for chunk in export_pages(conn):
                out.write(chunk)
                count += chunk.count(b"\n")
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------- measurement


async def verify_db(dsn: str) -> Report:
    async with connected(dsn) as conn:
        return await verify_database(conn)


async def verify_file(path: Path) -> Report:
    with path.open("rb") as file:
        return await verify(read_export(file), Report(source="export"), contiguous=True)


async def build_tree(path: Path) -> tuple[float, bytes, int]:
    """The export's tree, as `audit verify --checkpoint` builds it: (events/s, root, leaves)."""
    started = time.perf_counter()
    frontier = Frontier()
    with path.open("rb") as file:
        async for batch in read_export(file):
            frontier.extend([leaf_of(row[0], row[6]) for row in batch])
    return frontier.size / (time.perf_counter() - started), frontier.root(), frontier.size


async def fold_stored(dsn: str, events: int) -> tuple[float, bytes]:
    async with connected(dsn) as conn:
        started = time.perf_counter()
        size = await tree_store.catch_up(conn, events, 5000)
        rate = size / (time.perf_counter() - started)
        return rate, await tree_store.root(conn, events)


async def drive_proofs(base: str, headers: dict[str, str], kind: str, size: int, root: bytes, connections: int,
                       seconds: float) -> float:
    """Proofs/s served, every answer checked against the export's root (a failed check aborts)."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(seed: int, session: aiohttp.ClientSession) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.perf_counter() < stop_at:
            if kind == "inclusion":
                position = rng.randrange(1, size + 1)
                params = {"position": position, "tree_size": size}
            else:
                first = rng.randrange(1, size)
                params = {"first": first, "second": size}
            async with session.get(f"{base}/v1/audit/proofs/{kind}", params=params, headers=headers) as reply:
                body = await reply.json()
                if reply.status != 200:
                    raise SystemExit(f"{kind} proof: {reply.status} {body}")
            path = [bytes.fromhex(h) for h in body["audit_path"]]
            if kind == "inclusion":
                ok = verify_inclusion(position - 1, size, bytes.fromhex(body["leaf_hash"]), path, root)
            else:
                ok = verify_consistency(first, size, bytes.fromhex(body["first_root"]), root, path)
            if not ok:
                raise SystemExit(f"{kind} proof does not verify: {params}")
            done += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(n, session) for n in range(connections)))
        return done / (time.perf_counter() - started)


async def serve_proofs(dsn: str, size: int, root: bytes, args: argparse.Namespace) -> dict[str, float]:
    """Proofs/s of each kind, and the server process's CPU time per proof (in microseconds): on a
    shared machine the rate follows the CPU left over, the CPU per proof much less."""
    token = await admin_token(dsn)
    port = free_port()
    env = serve_env(dsn, port, RUN_PROJECTIONS="false")
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env)  # noqa: ASYNC220
    base = f"http://127.0.0.1:{port}"
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    try:
        await wait_ready(base, proc)
        headers = {"Authorization": f"Bearer {token}"}
        await drive_proofs(base, headers, "inclusion", size, root, args.connections, 1.0)  # warm up
        rates = {}
        server = psutil.Process(proc.pid)
        for kind in ("inclusion", "consistency"):
            cpu, started = cpu_seconds([server]), time.perf_counter()
            rates[kind] = await drive_proofs(base, headers, kind, size, root, args.connections, seconds)
            served = rates[kind] * (time.perf_counter() - started)
            rates[f"{kind}_server_cpu_us"] = (cpu_seconds([server]) - cpu) / served * 1e6
            print(f"  {kind:11s} proofs {rates[kind]:>10,.0f}/s over HTTP ({args.connections} clients), "
                  f"server CPU {rates[f'{kind}_server_cpu_us']:,.0f} us per proof", file=sys.stderr, flush=True)
        return rates
    finally:
        proc.terminate()
        proc.wait(30)


def checked(report: Report, events: int) -> float:
    if not report.ok or report.events_checked != events:
        raise SystemExit(f"verification failed: {report.as_dict()}")
    return report.events_per_s


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds = args.rounds or (1 if args.quick else 3)
    samples: dict[str, list[float]] = {"database": [], "export": [], "tree": []}
    async with chosen_server(args.dsn) as server:
        print(await describe_server(server), flush=True)
        async with fresh_database(server, "audit") as dsn:
            await migrated(dsn)
            fill_rate = await fill(dsn, args.events, args.streams)
            await analyze(dsn)
            print(f"log: {args.events} events over {args.streams} streams, appended at {fill_rate:,.0f} events/s")
            with tempfile.TemporaryDirectory(prefix="tally-audit-bench-") as tmp:
                path = Path(tmp) / "export.ndjson"
                export_rate = await export_to(dsn, path)
                size_mb = path.stat().st_size / 1e6
                print(f"export: {size_mb:.1f} MB at {export_rate:,.0f} events/s")
                for round_no in range(1, rounds + 1):
                    for name in ("database", "export"):
                        report = await (verify_db(dsn) if name == "database" else verify_file(path))
                        samples[name].append(checked(report, args.events))
                        print(f"  round {round_no} {name:8s} {samples[name][-1]:>12,.0f} events/s", file=sys.stderr,
                              flush=True)
                    rate, root, leaves = await build_tree(path)
                    samples["tree"].append(rate)
                    print(f"  round {round_no} tree     {rate:>12,.0f} events/s", file=sys.stderr, flush=True)
                    if leaves != args.events:
                        raise SystemExit(f"the tree has {leaves} leaves, not {args.events}")
            fold_rate, stored_root = await fold_stored(dsn, args.events)
            if stored_root != root:
                raise SystemExit("the stored tree's root differs from the export's")
            print(f"fold: the stored tree built at {fold_rate:,.0f} events/s (one connection)")
            proofs = await serve_proofs(dsn, args.events, root, args)
    db_rate, file_rate = statistics.median(samples["database"]), statistics.median(samples["export"])
    tree_rate = statistics.median(samples["tree"])
    print(f"{'source':10s} {'events/s (median)':>18s}  rounds")
    for name, rate in (("database", db_rate), ("export", file_rate), ("tree", tree_rate)):
        shown = ", ".join(f"{s:,.0f}" for s in samples[name])
        verdict = "meets" if rate >= TARGET else "BELOW"
        print(f"{name:10s} {rate:>18,.0f}  {shown}  ({verdict} the {TARGET:,} events/s target)")
    for kind in ("inclusion", "consistency"):
        rate, cpu = proofs[kind], proofs[f"{kind}_server_cpu_us"]
        verdict = "meets" if rate >= PROOF_TARGET else "BELOW"
        print(f"{kind:11s} {rate:>17,.0f}  proofs/s over HTTP, server CPU {cpu:,.0f} us/proof  "
              f"({verdict} the {PROOF_TARGET:,} proofs/s target)")
    return {"bench": "audit", "events": args.events, "db_events_per_s": round(db_rate),
            "export_events_per_s": round(file_rate), "export_write_events_per_s": round(export_rate),
            "tree_events_per_s": round(tree_rate), "fold_events_per_s": round(fold_rate),
            "inclusion_proofs_per_s": round(proofs["inclusion"]),
            "consistency_proofs_per_s": round(proofs["consistency"]),
            "inclusion_server_cpu_us": round(proofs["inclusion_server_cpu_us"]),
            "consistency_server_cpu_us": round(proofs["consistency_server_cpu_us"])}
