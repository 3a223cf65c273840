"""SSE fan-out to many followers (`bench.py sse --followers N`): N clients each follow their own wallet.

N subscribers each follow one wallet's stream (``/v1/streams/wallets/{id}``) while events land on those
wallets at R events/s in total, round-robin (WalletCredited appended straight to the store by a writer
process, ``--writer appends``, or committed through the command bus, ``--writer commands``). The server
is a real ``python -m backend serve`` subprocess, so its CPU and RSS are read from /proc; the followers
are raw sockets spread over a few client processes, each reading every byte, parsing the frames and
noting, per event id, when its bytes reached the socket (the kernel's receive timestamp, SO_TIMESTAMPNS).

Measured: every event delivered (per follower, the ids received equal its wallet's events in the log),
commit-to-socket latency p50/p99 over the measured window, the server's RSS growth per follower (idle,
and after the load), the kernel's TCP memory (both ends, /proc/net/sockstat), and the server's CPU
seconds per delivered frame; beside it, in the same run, the existing 1,000-subscriber case of
``bench.py sse`` (a: S subscribers on ``/v1/streams/events``, one round), with the same CPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import resource
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from bench_http import admin_token, cpu_seconds
from bench_sse import (
    RawStream,
    arrival,
    delivery,
    finish_profile,
    head_of,
    receive,
    runqueue_seconds,
    serving,
    spawn,
    start_profile,
    writer_process,
)
from bench_store import chosen_server, fresh_database, percentile

from backend.db import pool_options
from backend.domain import Wallet
from backend.store.event_store import EventStore
from backend.store.repository import Repository

CLIENT_PROCESSES = 4
FRAME = re.compile(rb"id: (\d+)(\ndata: )?")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `bench.py sse` adds for the followers case (the rest are bench_sse's)."""
    parser.add_argument("--followers", type=int, default=0,
                        help="N wallet-stream followers, each on its own wallet (runs this case, and (a) "
                             "with --subscribers beside it, instead of (a), (b), (c))")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds of the followers case")
    parser.add_argument("--objects", action="store_true",
                        help="count instead what a follower costs in objects and bytes, in a server process that "
                             "answers a census (deterministic; no timing figures)")
    parser.add_argument("--gc-log", action="store_true",
                        help="serve the followers from a process that reports its garbage collections during "
                             "the measured window (the same app and settings as `serve`, started in-process)")
    parser.add_argument("--send-buffer", type=int, default=None,
                        help="SSE_SOCKET_SEND_BUFFER for the followers' server (default: the server's own)")


# ---------------------------------------------------------------- followers (client processes)


class Follower(RawStream):
    """One wallet stream on a raw socket: every frame parsed, each event id noted with the kernel's
    receive timestamp of the bytes that completed it."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.stamp_arrivals()
        self.events: list[tuple[int, float]] = []
        self.checkpoints = 0
        self._buffer = b""

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(1 << 16, 64)
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        if not data:
            self.ended = True
            if not self.opened.done():
                self.opened.set_exception(RuntimeError("closed before the stream opened"))
            self.close()
            return
        arrived = arrival(ancillary)
        if not self.opened.done():
            if not data.startswith(b"HTTP/1.1 200"):
                self.opened.set_exception(RuntimeError(repr(data[:300])))
                return
            self.opened.set_result(None)
        *complete, self._buffer = (self._buffer + data).split(b"\n\n")
        for frame in complete:
            match = FRAME.search(frame)
            if match is None:
                continue
            if match[2]:
                self.events.append((int(match[1]), arrived))
            elif b"retry: " not in frame:  # not the opening frame: an id-only checkpoint
                self.checkpoints += 1


def followers_process(conn: Any, host: str, port: int, token: str, wallets: list[str], after: int) -> None:
    """Open a follower per wallet, say "ready", hold them until told "stop", then send what arrived."""
    raise_fd_limit()

    async def main() -> None:
        followers: list[Follower] = []

        async def one(wallet: str) -> None:
            request = (f"GET /v1/streams/wallets/{wallet}?after={after} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                       f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode()
            follower = Follower(request)
            followers.append(follower)
            await follower.start(host, port)
            await asyncio.wait_for(follower.opened, 120)

        for first in range(0, len(wallets), 100):  # in waves: a burst of connects overflows the listen backlog
            await asyncio.gather(*(one(w) for w in wallets[first:first + 100]))
        conn.send("ready")
        started = time.process_time()
        await asyncio.to_thread(conn.recv)
        cpu = time.process_time() - started
        for follower in followers:
            follower.close()
        conn.send({"events": [f.events for f in followers], "checkpoints": sum(f.checkpoints for f in followers),
                   "ended": sum(f.ended for f in followers), "cpu_s": cpu})

    asyncio.run(main())
    conn.close()


# ---------------------------------------------------------------- helpers


def raise_fd_limit() -> None:
    """Ten thousand sockets need more descriptors than the usual soft limit: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def tcp_memory_kib() -> float:
    """The kernel's memory in TCP socket buffers, machine-wide (both ends of every connection)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    return float("nan")


async def seed_wallets(dsn: str, count: int) -> list[str]:
    """count wallets, opened in batches (one append per batch)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, **pool_options())
    assert pool is not None
    store = EventStore(pool)
    repository = Repository(store)
    ids: list[str] = []
    try:
        for first in range(0, count, 250):
            now = datetime.now(UTC)
            wallets = [Wallet.open(uuid.uuid4(), f"owner-{i % 10}", "USD", now)
                       for i in range(first, min(first + 250, count))]
            await repository.save(*wallets)
            ids += [str(w.id) for w in wallets]
    finally:
        await store.close()
        await pool.close()
    return ids


async def positions_by_stream(dsn: str, after: int) -> dict[str, list[int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("select position, stream_id from events where position > $1 order by position", after)
    finally:
        await conn.close()
    found: dict[str, list[int]] = {}
    for row in rows:
        found.setdefault(row["stream_id"], []).append(row["position"])
    return found


# ---------------------------------------------------------------- the followers case


async def no_streams(server: psutil.Process, dsn: str, wallets: list[str], args: argparse.Namespace) -> float:
    """Server CPU seconds per event with no stream open: what every event costs it anyway (the command
    or append's notification, the projections), to tell the streams' share apart."""
    seconds = min(5.0, args.duration)
    writer, writer_proc = spawn(writer_process, dsn, wallets, args.rate, 1.0 + seconds, args.writer)
    await asyncio.sleep(1.0)
    cpu0, t0 = cpu_seconds([server]), time.monotonic()
    written = await receive(writer, 600)
    writer_proc.join()
    cpu1 = cpu_seconds([server])
    events = sum(1 for _, mono, _ in written["committed"] if mono >= t0)
    return (cpu1 - cpu0) / max(1, events)


async def open_followers(port: int, token: str, wallets: list[str], after: int) -> list[tuple[Any, Any]]:
    share = -(-len(wallets) // CLIENT_PROCESSES)
    clients = [spawn(followers_process, "127.0.0.1", port, token, wallets[i:i + share], after)
               for i in range(0, len(wallets), share)]
    for conn, _ in clients:
        assert await receive(conn, 900) == "ready"
    return clients


@contextlib.asynccontextmanager
async def followers_server(dsn: str, streams: int, args: argparse.Namespace
                           ) -> AsyncIterator[tuple[psutil.Process, int, Any]]:
    """`serve` in a subprocess; with --gc-log, the same app in a process that reports its collections."""
    if args.gc_log:
        from bench_fanout_objects import gc_logging_server

        overrides = {"sse_socket_send_buffer": args.send_buffer} if args.send_buffer else {}
        async with gc_logging_server(dsn, streams, **overrides) as served:
            yield served
        return
    settings = {"SSE_SOCKET_SEND_BUFFER": str(args.send_buffer)} if args.send_buffer else {}
    async with serving(dsn, streams, **settings) as (server, port):
        yield server, port, None


async def followers_case(dsn: str, token: str, wallets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    warmup = 2.0
    async with followers_server(dsn, len(wallets) + 200, args) as (server, port, collected):
        baseline = await no_streams(server, dsn, wallets, args)
        after = await head_of(dsn)
        warm = await open_followers(port, token, wallets[:100], after)  # the code paths, once
        for conn, proc in warm:
            conn.send("stop")
            await receive(conn)
            proc.join()
        await asyncio.sleep(1.0)
        rss0, tcp0 = server.memory_info().rss, tcp_memory_kib()
        opening = time.monotonic()
        clients = await open_followers(port, token, wallets, after)
        opened_s = time.monotonic() - opening
        await asyncio.sleep(1.0)
        rss1, tcp1 = server.memory_info().rss, tcp_memory_kib()

        writer, writer_proc = spawn(writer_process, dsn, wallets, args.rate, warmup + args.duration, args.writer)
        await asyncio.sleep(warmup)
        if collected is not None:
            await collected()  # from here on
        cpu0, queue0, t0, wall0 = cpu_seconds([server]), runqueue_seconds(server.pid), time.monotonic(), time.time()
        profile = start_profile(server.pid, args.duration) if args.profile else None
        written = await receive(writer, 600)
        writer_proc.join()
        cpu1, queue1, t1, wall1 = cpu_seconds([server]), runqueue_seconds(server.pid), time.monotonic(), time.time()
        in_window = await collected() if collected is not None else None
        profiled = finish_profile(profile) if profile else None
        await asyncio.sleep(3.0)  # the last events reach everyone
        rss2, tcp2 = server.memory_info().rss, tcp_memory_kib()
        received = []
        for conn, proc in clients:
            conn.send("stop")
            received.append(await receive(conn, 120))
            proc.join()

    expected = await positions_by_stream(dsn, after)
    events = [follower for got in received for follower in got["events"]]
    commit_wall = {p: clock for p, mono, clock in written["committed"] if t0 <= mono <= t1}
    complete, missing, extra = 0, 0, 0
    latencies: list[float] = []
    delivered_in_window = 0
    for wallet, got in zip(wallets, events, strict=True):
        want = expected.get(f"wallet-{wallet}", [])
        ids = [p for p, _ in got]
        complete += ids == want
        missing += len(set(want) - set(ids))
        extra += len(ids) - len(set(ids) & set(want))
        for position, arrived in got:
            if position in commit_wall:
                latencies.append(arrived - commit_wall[position])
            if wall0 <= arrived <= wall1:
                delivered_in_window += 1
    latencies.sort()
    n = len(wallets)
    return {
        "followers": n, "opened_s": opened_s, "events": sum(len(v) for v in expected.values()),
        "events_per_s": len(commit_wall) / (t1 - t0),
        "followers_complete": complete, "missing": missing, "extra": extra,
        "ended": sum(got["ended"] for got in received),
        "checkpoints": sum(got["checkpoints"] for got in received),
        "delivery_p50_ms": percentile(latencies, 0.50) * 1000, "delivery_p99_ms": percentile(latencies, 0.99) * 1000,
        "delivery_max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "server_cpu_cores": (cpu1 - cpu0) / (t1 - t0), "server_waiting_cores": (queue1 - queue0) / (t1 - t0),
        "server_cpu_us_per_frame": (cpu1 - cpu0) / max(1, delivered_in_window) * 1e6,
        "server_cpu_us_per_event_without_streams": baseline * 1e6,
        "server_cpu_us_per_frame_streams_only": (cpu1 - cpu0 - baseline * len(commit_wall))
        / max(1, delivered_in_window) * 1e6,
        "frames_in_window": delivered_in_window,
        "rss_before_mib": rss0 / 2**20, "rss_idle_mib": rss1 / 2**20, "rss_after_load_mib": rss2 / 2**20,
        "rss_kib_per_follower_idle": (rss1 - rss0) / n / 1024,
        "rss_kib_per_follower_after_load": (rss2 - rss0) / n / 1024,
        "tcp_kib_per_follower_idle": (tcp1 - tcp0) / n, "tcp_kib_per_follower_after_load": (tcp2 - tcp0) / n,
        "send_buffer": args.send_buffer, "writer_cpu_cores": written["cpu_s"] / (warmup + args.duration),
        "profile": profiled, "collections_in_window": in_window,
        "clients_cpu_cores": sum(got["cpu_s"] for got in received) / (t1 - t0 + warmup + 3.0),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    if args.objects:
        from bench_fanout_objects import run_objects

        return await run_objects(args)
    async with chosen_server(args.dsn) as db, fresh_database(db, "fanout") as dsn:
        token = await admin_token(dsn)
        wallets = await seed_wallets(dsn, args.followers)
        async with serving(dsn, args.subscribers + 100) as (server, port):  # (a), one round, beside it
            a = await delivery(server, port, token, dsn, wallets[:args.wallets], args, args.duration, 1)
        f = await followers_case(dsn, token, wallets, args)
    a_cpu_us = a["cpu_shares"]["server"] / (a["events_per_s"] * a["subscribers"]) * 1e6
    print(f"server: {db.description}; {os.cpu_count()} cores; writer: {args.writer}")
    print(f"{'case':<44} {'events/s':>8} {'frames/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'server cores':>12} {'CPU µs/frame':>12}")
    print(f"{'(a) ' + str(a['subscribers']) + ' subscribers, /v1/streams/events':<44} {a['events_per_s']:>8.0f} "
          f"{a['events_per_s'] * a['subscribers']:>9.0f} {a['delivery_p50_ms']:>7.1f} {a['delivery_p99_ms']:>7.1f} "
          f"{a['delivery_max_ms']:>7.1f} {a['cpu_shares']['server']:>12.2f} {a_cpu_us:>12.1f}")
    print(f"{str(f['followers']) + ' followers, /v1/streams/wallets/{id}':<44} {f['events_per_s']:>8.0f} "
          f"{f['frames_in_window'] / args.duration:>9.0f} {f['delivery_p50_ms']:>7.1f} {f['delivery_p99_ms']:>7.1f} "
          f"{f['delivery_max_ms']:>7.1f} {f['server_cpu_cores']:>12.2f} {f['server_cpu_us_per_frame']:>12.1f}")
    print(f"(a): {a['missing']} events missing at the probes, {a['dropped']} streams dropped")
    base = f["server_cpu_us_per_event_without_streams"]
    print(f"with no stream open the server spends {base:.0f} µs per event (notification, projections); less that: "
          f"(a) {(a['cpu_shares']['server'] / a['events_per_s'] * 1e6 - base) / a['subscribers']:.1f} µs per frame, "
          f"followers {f['server_cpu_us_per_frame_streams_only']:.1f} µs per frame")
    print(f"followers: {f['followers_complete']} of {f['followers']} received exactly their wallet's "
          f"{f['events']} events in all ({f['missing']} missing, {f['extra']} extra, {f['ended']} streams ended); "
          f"{f['checkpoints']} id-only checkpoints; opened in {f['opened_s']:.1f} s; the server's loop waited "
          f"for a CPU {f['server_waiting_cores']:.2f} of the time; writer {f['writer_cpu_cores']:.2f} cores, "
          f"clients {f['clients_cpu_cores']:.2f} cores")
    print(f"server RSS {f['rss_before_mib']:.1f} -> {f['rss_idle_mib']:.1f} MiB with the followers idle -> "
          f"{f['rss_after_load_mib']:.1f} MiB after the load: {f['rss_kib_per_follower_idle']:.1f} KiB per follower "
          f"idle, {f['rss_kib_per_follower_after_load']:.1f} KiB after the load; kernel TCP buffers (both ends) "
          f"{f['tcp_kib_per_follower_idle']:.1f} / {f['tcp_kib_per_follower_after_load']:.1f} KiB per follower "
          f"(SSE_SOCKET_SEND_BUFFER {f['send_buffer'] or 'default'})")
    if f["collections_in_window"] is not None:
        print("server garbage collections in the measured window: "
              + ("; ".join(f"generation {gen}: {n} (longest {longest:.1f} ms, {total:.1f} ms in all)"
                           for gen, (n, longest, total) in f["collections_in_window"].items()) or "none"))
    if f["profile"]:
        print("    server CPU by function during the followers case (own time, py-spy):")
        for name, share in f["profile"]:
            print(f"      {share * 100:5.1f} %  {name}")
    for target, met in (("every event delivered", f["followers_complete"] == f["followers"] and not f["extra"]),
                        ("delivery p99 <= 100 ms", f["delivery_p99_ms"] <= 100),
                        ("<= 20 KiB per follower", f["rss_kib_per_follower_after_load"] <= 20)):
        print(f"target {target}: {'met' if met else 'NOT met'}")
    return {"bench": "sse-followers", "followers": f["followers"], "events_per_s": round(f["events_per_s"], 1),
            "followers_complete": f["followers_complete"], "missing": f["missing"],
            "delivery_p50_ms": round(f["delivery_p50_ms"], 2), "delivery_p99_ms": round(f["delivery_p99_ms"], 2),
            "rss_kib_per_follower": round(f["rss_kib_per_follower_after_load"], 2),
            "server_cpu_us_per_frame": round(f["server_cpu_us_per_frame"], 1),
            "server_cpu_us_per_frame_streams_only": round(f["server_cpu_us_per_frame_streams_only"], 1),
            "subscribers": a["subscribers"], "subscribers_delivery_p99_ms": round(a["delivery_p99_ms"], 2),
            "subscribers_server_cpu_us_per_frame": round(a_cpu_us, 1),
            "collections_in_window": f["collections_in_window"]}
