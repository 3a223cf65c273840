"""What a wallet-stream follower costs the server in objects and bytes (`bench.py sse --followers N --objects`).

Timings on a shared machine are noise; a count of objects is not. The server runs in a child process
on the loop `serve` uses (its app, protocol and GC settings, `tune_for_serving` included), and answers
a census when asked: the objects the cyclic collector tracks (each one more for a full collection to
walk), their types, the bytes Python allocated since startup (tracemalloc), and how long one full
collection takes. Taken after a warm-up, with the N followers idle, and after R events/s landed on
their wallets for a few seconds: the differences, divided by N, are a follower's share.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psutil
from bench_fanout import open_followers, positions_by_stream, seed_wallets
from bench_http import admin_token, free_port
from bench_sse import head_of, receive, spawn, writer_process
from bench_store import choose_server, fresh_database


def timer_callback(handle: object) -> str:
    """Whose timer it is: its callback's name (the first object it refers to, for asyncio and uvloop)."""
    referents = gc.get_referents(handle)
    return str(getattr(referents[0], "__qualname__", type(referents[0]).__name__)) if referents else "?"


class Collections:
    """The server's garbage collections, per generation: how many, and their longest and total pause."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seen: dict[int, list[float]] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        else:
            self.seen.setdefault(info["generation"], []).append(time.perf_counter() - self.started)

    def take(self) -> dict[int, tuple[int, float, float]]:
        """Since the last take: per generation, (collections, longest ms, total ms)."""
        seen, self.seen = self.seen, {}
        return {gen: (len(p), max(p) * 1000, sum(p) * 1000) for gen, p in sorted(seen.items())}


COLLECTIONS = Collections()


def census() -> dict[str, Any]:
    """The server's tracked objects (by type), traced bytes and a full collection's duration, after
    collecting what is garbage already."""
    collections_since = COLLECTIONS.take()
    gc.collect()
    started = time.perf_counter()
    gc.collect()
    pause = time.perf_counter() - started
    COLLECTIONS.take()
    objects = gc.get_objects()
    types = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    types.update(f"Task:{getattr(task.get_coro(), '__qualname__', '?')}" for task in asyncio.all_tasks())
    types.update(f"timer:{timer_callback(o)}" for o in objects if type(o).__name__ == "TimerHandle")
    count = len(objects)
    del objects
    return {"tracked": count, "types": dict(types), "traced_bytes": tracemalloc.get_traced_memory()[0],
            "blocks": sys.getallocatedblocks(), "full_gc_ms": pause * 1000, "collections": collections_since,
            "gc_threshold": gc.get_threshold()}


def server_process(conn: Any, dsn: str, streams: int, trace: bool = True, **overrides: Any) -> None:
    """Serve as `python -m backend serve` does, and answer "census", "streams" and "collections"
    requests until told "stop". trace: trace allocations (for the census; it slows the server)."""
    from backend.app import create_app
    from backend.appkeys import HUB
    from backend.config import load_settings
    from backend.event_loop import run
    from backend.gc_tuning import tune_for_serving
    from backend.server.run import start

    settings = load_settings(database_url=dsn, port=free_port(), log_level="WARNING", pool_max_size=20,
                             rate_limit_per_s=0, auth_failure_rate_per_s=0, sse_max_streams=streams,
                             sse_max_streams_per_key=streams, **overrides)

    async def main() -> None:
        app = create_app(settings)
        serving = await start(app, settings)
        tune_for_serving()
        gc.callbacks.append(COLLECTIONS)
        if trace:
            tracemalloc.start()
        conn.send(serving.port)
        answers = {"census": census, "streams": lambda: app[HUB].streams, "collections": COLLECTIONS.take}
        try:
            while (request := await asyncio.to_thread(conn.recv)) in answers:
                conn.send(answers[request]())
        finally:
            await serving.stop(settings.shutdown_timeout_s)

    run(main(), settings.event_loop)
    conn.close()


IDLE_S = 20.0
"""How long the server's CPU is measured with the followers idle: four checkpoint ticks."""

Collected = Callable[[], Awaitable[dict[int, tuple[int, float, float]]]]


@contextlib.asynccontextmanager
async def gc_logging_server(dsn: str, streams: int, **overrides: Any
                            ) -> AsyncIterator[tuple[psutil.Process, int, Collected]]:
    """A server as `serve` runs it (no tracing) that tells its garbage collections since the last ask:
    whether a latency's tail was the collector or something else."""
    conn, proc = spawn(server_process, dsn, streams, False, **overrides)
    try:
        port = int(await receive(conn, 120))

        async def collected() -> dict[int, tuple[int, float, float]]:
            conn.send("collections")
            return dict(await receive(conn, 60))

        yield psutil.Process(proc.pid), port, collected
    finally:
        conn.send("stop")
        await asyncio.to_thread(proc.join, 60)


def per_follower(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    types = {name: (after["types"].get(name, 0) - before["types"].get(name, 0)) / n
             for name in set(after["types"]) | set(before["types"])}
    top = sorted(((name, per) for name, per in types.items() if abs(per) >= 0.5), key=lambda item: -item[1])
    return {"tracked_per_follower": (after["tracked"] - before["tracked"]) / n,
            "traced_kib_per_follower": (after["traced_bytes"] - before["traced_bytes"]) / n / 1024,
            "blocks_per_follower": (after["blocks"] - before["blocks"]) / n,
            "full_gc_ms": after["full_gc_ms"], "types": [(name, round(per, 2)) for name, per in top]}


async def run_objects(args: argparse.Namespace) -> dict[str, Any]:
    db = await choose_server(args.dsn)
    try:
        async with fresh_database(db, "fanobj") as dsn:
            token = await admin_token(dsn)
            wallets = await seed_wallets(dsn, args.followers)
            conn, proc = spawn(server_process, dsn, len(wallets) + 200)
            port = await receive(conn, 120)

            async def take() -> dict[str, Any]:
                conn.send("census")
                return dict(await receive(conn, 600))

            async def streams() -> int:
                conn.send("streams")
                return int(await receive(conn, 60))

            try:
                after = await head_of(dsn)
                for conn_, proc_ in await open_followers(port, token, wallets[:100], after):  # the code paths once
                    conn_.send("stop")
                    await receive(conn_)
                    proc_.join()
                for _ in range(120):  # their streams end by the next tick
                    if not await streams():
                        break
                    await asyncio.sleep(0.5)
                base = await take()
                clients = await open_followers(port, token, wallets, after)
                await asyncio.sleep(1.0)
                idle = await take()
                server = psutil.Process(proc.pid)
                cpu0 = sum(server.cpu_times()[:2])
                await asyncio.sleep(IDLE_S)
                idle_cpu = sum(server.cpu_times()[:2]) - cpu0
                writer, writer_proc = spawn(writer_process, dsn, wallets, args.rate, args.duration, args.writer)
                await receive(writer, 600)
                writer_proc.join()
                await asyncio.sleep(5.0)  # the last events reach everyone (slower here: tracemalloc)
                loaded = await take()
                received = []
                for conn_, proc_ in clients:
                    conn_.send("stop")
                    received.append(await receive(conn_, 120))
                    proc_.join()
            finally:
                conn.send("stop")
                proc.join(60)
            expected = await positions_by_stream(dsn, after)
    finally:
        if db.stop is not None:
            db.stop()
    got = [[p for p, _ in follower] for batch in received for follower in batch["events"]]
    complete = sum(ids == expected.get(f"wallet-{w}", []) for w, ids in zip(wallets, got, strict=True))
    n = len(wallets)
    idle_share, loaded_share = per_follower(base, idle, n), per_follower(base, loaded, n)
    print(f"server process {os.getpid()}: {n} followers; {sum(map(len, expected.values()))} events at "
          f"{args.rate}/s for {args.duration:.0f} s; {complete} of {n} followers received exactly their events")
    print(f"with the followers idle (no events), the server used {idle_cpu / IDLE_S * 1000:.1f} ms of CPU a second, "
          f"{idle_cpu / IDLE_S / n * 1e6:.2f} µs a second per follower (tracing allocations: slower than `serve`)")
    print(f"baseline: {base['tracked']} tracked objects, full collection {base['full_gc_ms']:.1f} ms, "
          f"GC threshold {base['gc_threshold']}")
    for label, share, at in (("idle", idle_share, idle), ("after load", loaded_share, loaded)):
        print(f"{label}: {share['tracked_per_follower']:.1f} tracked objects, {share['traced_kib_per_follower']:.2f} "
              f"KiB traced, {share['blocks_per_follower']:.1f} allocated blocks per follower; {at['tracked']} "
              f"tracked in all, one full collection {at['full_gc_ms']:.1f} ms")
        print(f"    garbage collections since the last census (generation: count, longest ms, total ms): "
              f"{at['collections']}")
        print("    per follower by type: " + ", ".join(f"{name} {per}" for name, per in share["types"]))
    return {"bench": "sse-followers-objects", "followers": n, "followers_complete": complete,
            "tracked_per_follower_idle": round(idle_share["tracked_per_follower"], 2),
            "tracked_per_follower_after_load": round(loaded_share["tracked_per_follower"], 2),
            "traced_kib_per_follower_idle": round(idle_share["traced_kib_per_follower"], 2),
            "traced_kib_per_follower_after_load": round(loaded_share["traced_kib_per_follower"], 2),
            "full_gc_ms_baseline": round(base["full_gc_ms"], 1), "full_gc_ms_idle": round(idle["full_gc_ms"], 1),
            "full_gc_ms_after_load": round(loaded["full_gc_ms"], 1),
            "idle_cpu_ms_per_s": round(idle_cpu / IDLE_S * 1000, 1)}
