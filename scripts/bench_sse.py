"""SSE fan-out: delivery latency at S subscribers x R events/s, memory per idle subscriber, frozen-client eviction.

One `python -m backend serve` process holds the streams. Commands (wallet credits through the command bus)
commit in a separate writer process, as they would in another Tally process, so every event reaches the
streams through PostgreSQL and the server's one LISTEN connection (`--writer appends` appends the same
events straight to the store instead: a lighter writer, for a machine with few cores). Subscribers are raw
sockets in a third process: every one receives everything (most discard it in the kernel); every k-th one
(a probe) also notes when each event id arrives. Commit-to-delivery latency is that arrival minus the
moment the writer's command returned, with arrival taken two ways: when the bytes reached the probe's
socket (the kernel's receive timestamp, SO_TIMESTAMPNS; what the server controls, and the figure in the
JSON line) and when the load generator's event loop got round to reading them (which adds the lag of one
Python process reading 1,000 sockets). (a) runs three rounds on the same subscribers and reports the
median round. Where the CPU went: each process's share of a core, the time the server's event loop was
runnable but waiting for a CPU (/proc schedstat), and with --profile the server's functions (py-spy).

(a) S subscribers on /v1/streams/events while commands commit at R events/s: delivery p50/p99.
(b) N idle subscribers: the server's RSS growth divided by N (on a fresh server process), side by side
    with the same measurement of a bare aiohttp-sse handler (no authentication, no hub): the peer.
(c) A frozen client (stops reading, small receive buffer) while events flow: seconds from the moment its
    receive buffer stopped filling (no send to it can complete) until the server no longer holds the socket.

`--followers N` runs another case instead (see bench_fanout): N followers, each of its own wallet's stream,
with (a) beside it in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import multiprocessing
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from bench_http import (
    admin_token,
    cpu_by_process,
    cpu_seconds,
    cpu_used,
    event_loop_of,
    free_port,
    postgres_processes,
    scrape,
    serve_env,
    wait_ready,
)
from bench_store import Server, chosen_server, fresh_database, percentile

from backend.commands import wallets as wallet_commands
from backend.commands.bus import CommandBus
from backend.commands.context import SYSTEM, CommandContext
from backend.db import pool_options
from backend.domain import wallet_stream
from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent
from backend.store.reads import head
from backend.store.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
PROBE_EVERY = 20
ID_LINE = re.compile(rb"\nid: (\d+)\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL server to create the bench database on")
    parser.add_argument("--subscribers", type=int, default=1000, help="live subscribers in (a) (default 1000)")
    parser.add_argument("--rate", type=int, default=1000, help="events committed per second in (a) (default 1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time of each of the 3 rounds of (a)")
    parser.add_argument("--idle", type=int, default=10_000, help="idle subscribers in (b) (default 10000)")
    parser.add_argument("--wallets", type=int, default=100, help="wallets the credits spread over")
    parser.add_argument("--writer", choices=("commands", "appends"), default="commands",
                        help="(a) commits credits through the command bus (default), or appends the same events "
                             "straight to the store: a lighter writer, for less CPU contention on a small machine")
    parser.add_argument("--profile", action="store_true", help="sample the server with py-spy during (a)")
    parser.add_argument("--quick", action="store_true", help="(a) 3 x 4 s, (b) 2,000 idle: whole run under 60 s")
    import bench_fanout  # imports this module: here, not at the top

    bench_fanout.add_arguments(parser)


# ---------------------------------------------------------------- subscribers (their own process)


SO_TIMESTAMPNS = 35  # Linux; the socket module does not name it
TIMESPEC = struct.Struct("qq")


class RawStream:
    """An SSE request on a raw, non-blocking socket, read by `_readable` whenever bytes arrive: the
    load generator's clients (here and in bench_fanout.py) cost it no HTTP library."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.ended = False

    def stamp_arrivals(self) -> None:
        """Have the kernel stamp what arrives (read back with `arrival`)."""
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, (host, port))
        await loop.sock_sendall(self.sock, self.request)
        loop.add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()


def arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive timestamp of a recvmsg's bytes (SO_TIMESTAMPNS), else the wall clock now."""
    stamp = next((TIMESPEC.unpack(payload[:16]) for level, kind, payload in ancillary
                  if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS), None)
    return stamp[0] + stamp[1] / 1e9 if stamp else time.time()


class Subscriber(RawStream):
    """A minimal SSE client on a raw socket: checks the status line, then discards what arrives in the
    kernel (recv with MSG_TRUNC copies nothing), swept every few milliseconds rather than on every
    arrival, so that a thousand of them cost the load generator little CPU. The server still writes
    every byte to every socket; the kernel buffers what arrives between sweeps."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.received = 0

    def _readable(self) -> None:
        """Until the stream is open (the sweeps take over then: see sweep)."""
        try:
            data = self._read()
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.ended = True
            self.close()
        elif type(self) is Subscriber:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def _read(self) -> bytes:
        head = self.sock.recv(1 << 16)
        if head.startswith(b"HTTP/1.1 200"):
            self.opened.set_result(None)
        elif head:
            self.opened.set_exception(RuntimeError(repr(head[:300])))
        self.received += len(head)
        return head

    def sweep(self) -> None:
        while not self.ended:
            try:
                count = self.sock.recv_into(DISCARD, len(DISCARD), socket.MSG_TRUNC)
            except BlockingIOError:
                return
            except OSError:
                count = 0
            if not count:
                self.ended = True
                self.close()
            self.received += count


DISCARD = bytearray(1 << 18)
SWEEP_S = 0.02


class Probe(Subscriber):
    """A subscriber that reads everything and notes, for every event id, when its bytes reached the
    socket (the kernel's receive timestamp) and when this process read them (monotonic clock)."""

    def __init__(self, request: bytes) -> None:
        super().__init__(request)
        self.stamp_arrivals()
        self.samples: list[tuple[int, float, float]] = []
        self._last_id = -1
        self._tail = b""

    def _read(self) -> bytes:
        data, ancillary, _, _ = self.sock.recvmsg(1 << 18, 64)
        read_at = time.monotonic()
        if not data:
            return data
        arrived_at = arrival(ancillary)
        self.received += len(data)
        if not self.opened.done():
            self.opened.set_result(None)
        text = self._tail + data
        cut = text.rfind(b"\n")
        for match in ID_LINE.finditer(text, 0, cut + 1):
            position = int(match[1])
            if position > self._last_id:
                self.samples.append((position, arrived_at, read_at))
                self._last_id = position
        self._tail = text[cut:] if cut >= 0 else text
        return data


def stream_request(host: str, port: int, token: str, query: str) -> bytes:
    return (f"GET /v1/streams/events?{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n").encode()


async def open_subscribers(host: str, port: int, token: str, query: str, count: int,
                           probe_every: int | None) -> list[Subscriber]:
    request = stream_request(host, port, token, query)
    subscribers: list[Subscriber] = []

    async def one(i: int) -> None:
        probe = probe_every is not None and i % probe_every == 0
        sub = Probe(request) if probe else Subscriber(request)
        await sub.start(host, port)
        await asyncio.wait_for(sub.opened, 60)
        subscribers.append(sub)

    for first in range(0, count, 200):  # in waves: a burst of connects overflows the listen backlog
        await asyncio.gather(*(one(i) for i in range(first, min(first + 200, count))))
    return subscribers


def subscribers_process(conn: Any, host: str, port: int, token: str, query: str, count: int,
                        probe_every: int | None) -> None:
    """Open count subscribers, say "ready", hold them until told "stop", then send the probes' samples."""

    async def main() -> None:
        subscribers = await open_subscribers(host, port, token, query, count, probe_every)
        plain = [s for s in subscribers if type(s) is Subscriber]

        async def sweep() -> None:
            while True:
                await asyncio.sleep(SWEEP_S)
                for sub in plain:
                    sub.sweep()

        sweeping = asyncio.create_task(sweep())
        started = time.process_time()
        conn.send("ready")
        await asyncio.to_thread(conn.recv)
        sweeping.cancel()
        cpu = time.process_time() - started
        samples = [s.samples for s in subscribers if isinstance(s, Probe)]
        dropped = sum(1 for s in subscribers if s.ended)
        for sub in subscribers:
            sub.close()
        conn.send({"samples": samples, "bytes": sum(s.received for s in subscribers), "cpu_s": cpu,
                   "dropped": dropped})

    asyncio.run(main())
    conn.close()


# ---------------------------------------------------------------- the command writer (its own process)


async def write_credits(dsn: str, wallets: list[str], rate: int, seconds: float, mode: str = "commands",
                        stop: Any = None, before_close: Callable[[list[tuple[int, float, float]]], Awaitable[None]]
                        | None = None) -> list[tuple[int, float, float]]:
    """Credit wallets at rate events/s for seconds (or until stop.poll()), through the command bus or
    (mode "appends") as WalletCredited events appended straight to the store; for each, the position and
    the monotonic and wall-clock times when the write returned. before_close gets them while the pool's
    connections are still open."""
    pool = await asyncpg.create_pool(dsn, min_size=4, max_size=10, **pool_options())
    assert pool is not None
    store = EventStore(pool)
    repository = Repository(store)
    bus = CommandBus(repository)
    committed: list[tuple[int, float, float]] = []
    ids = [uuid.UUID(w) for w in wallets]

    async def credit(i: int) -> None:
        wallet_id = ids[i % len(ids)]
        if mode == "appends":
            data = {"amount": 1, "reference": f"bench-{i}", "occurred_at": datetime.now(UTC).isoformat()}
            appended = await store.append_to(wallet_stream(wallet_id), ANY,
                                             [NewEvent("WalletCredited", data, {"schema_version": 1})])
            committed.append((appended.position, time.monotonic(), time.time()))
            return

        async def decide(ctx: CommandContext) -> Any:
            return await wallet_commands.credit(repository, ctx, wallet_id, 1, f"bench-{i}", None)

        reply = await bus.execute(CommandContext(SYSTEM), [wallet_stream(wallet_id)], decide)
        committed.append((reply.position, time.monotonic(), time.time()))

    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    sent = 0
    try:
        while (now := time.monotonic()) < started + seconds and not (stop is not None and stop.poll()):
            due = int((now - started) * rate)
            while sent < due:
                task = asyncio.create_task(credit(sent))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        if before_close is not None:
            await before_close(committed)
    finally:
        await store.close()
        await pool.close()
    return committed


def writer_process(conn: Any, dsn: str, wallets: list[str], rate: int, seconds: float, mode: str,
                   hold: bool = False) -> None:
    """Write for seconds, or until the parent sends anything; then send what was committed. With hold,
    keep the connections open until the parent sends again: their backends' CPU is counted only while
    they are alive."""
    started = time.process_time()

    async def report(committed: list[tuple[int, float, float]]) -> None:
        conn.send({"committed": committed, "cpu_s": time.process_time() - started})
        if hold:
            await asyncio.to_thread(conn.recv)

    asyncio.run(write_credits(dsn, wallets, rate, seconds, mode, conn, report))
    conn.close()


# ---------------------------------------------------------------- the phases


def spawn(target: Any, *args: Any) -> tuple[Any, multiprocessing.process.BaseProcess]:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=target, args=(child, *args), daemon=True)
    process.start()
    return parent, process


async def receive(conn: Any, timeout: float = 600) -> Any:
    async with asyncio.timeout(timeout):
        return await asyncio.to_thread(conn.recv)


async def seed_wallets(dsn: str, count: int) -> list[str]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, **pool_options())
    assert pool is not None
    store = EventStore(pool)
    repository = Repository(store)
    ids = []
    try:
        for i in range(count):
            wallet_id = uuid.uuid4()
            decision = await wallet_commands.open_wallet(repository, CommandContext(SYSTEM), wallet_id,
                                                         f"owner-{i % 10}", "USD")
            await repository.save(*decision.aggregates)
            ids.append(str(wallet_id))
    finally:
        await store.close()
        await pool.close()
    return ids


async def idle_memory(server: psutil.Process, port: int, token: str, count: int) -> dict[str, Any]:
    """(b): RSS growth of the server per idle subscriber (after a warm-up of the code paths)."""
    warm, warm_proc = spawn(subscribers_process, "127.0.0.1", port, token, "after=now", 100, None)
    await receive(warm)
    warm.send("stop")
    await receive(warm)
    warm_proc.join()
    await asyncio.sleep(0.5)  # let the server notice the closed streams
    before = server.memory_info().rss
    conn, proc = spawn(subscribers_process, "127.0.0.1", port, token, "after=now", count, None)
    await receive(conn)
    await asyncio.sleep(0.5)
    after = server.memory_info().rss
    conn.send("stop")
    result = await receive(conn)
    proc.join()
    return {"idle_subscribers": count, "rss_before_mib": before / 2**20, "rss_after_mib": after / 2**20,
            "rss_kib_per_idle_subscriber": (after - before) / count / 1024, "idle_dropped": result["dropped"]}


def bare_sse_server(conn: Any, port: int) -> None:
    """The peer of (b): a bare aiohttp-sse handler (no auth, no hub) holding idle streams."""
    from aiohttp import web
    from aiohttp_sse import sse_response

    async def handler(request: web.Request) -> web.StreamResponse:
        async with sse_response(request, sep="\n") as response:
            await response.send("", id="0", retry=3000)
            await response.wait()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/streams/events", handler)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        conn.send("ready")
        await asyncio.to_thread(conn.recv)
        await runner.cleanup()

    asyncio.run(main())


async def peer_idle_memory(count: int) -> dict[str, Any]:
    port = free_port()
    conn, proc = spawn(bare_sse_server, port)
    try:
        await receive(conn, 30)
        measured = await idle_memory(psutil.Process(proc.pid), port, "peer", count)
    finally:
        proc.terminate()  # a throwaway: no need to wait for its streams to notice their clients left
        proc.join(30)
    return {"peer_rss_kib_per_idle_subscriber": measured["rss_kib_per_idle_subscriber"]}


async def delivery(server: psutil.Process, port: int, token: str, dsn: str, wallets: list[str],
                   args: argparse.Namespace, seconds: float, rounds: int) -> dict[str, Any]:
    """(a): latency from the writer's commit to arrival at the probes, and where the CPU went; rounds
    measured windows (each after its own warm-up) over the same subscribers, medians reported."""
    warmup = 2.0
    start = await head_of(dsn)
    subs, subs_proc = spawn(subscribers_process, "127.0.0.1", port, token, f"after={start}",
                            args.subscribers, PROBE_EVERY)
    await receive(subs)
    subscribers = psutil.Process(subs_proc.pid)

    def cpu_now() -> dict[str, float]:
        return {"server": cpu_seconds([server]), "subscribers": cpu_seconds([subscribers]),
                "server waiting for a CPU": runqueue_seconds(server.pid)}

    windows = []
    for _ in range(rounds):
        writer, writer_proc = spawn(writer_process, dsn, wallets, args.rate, warmup + seconds, args.writer, True)
        await asyncio.sleep(warmup)
        # PostgreSQL's backends are listed after the warm-up, the writer's among them, and again before
        # the writer lets its own go (held open until then)
        cpu0, postgres0, t0 = cpu_now(), cpu_by_process(postgres_processes()), time.monotonic()
        profile = start_profile(server.pid, seconds) if args.profile else None
        written = await receive(writer)
        wall, cpu, postgres = time.monotonic() - t0, cpu_now(), cpu_used(postgres0, postgres_processes())
        writer.send("close")
        writer_proc.join()
        shares = {name: (cpu[name] - cpu0[name]) / wall for name in cpu0}
        shares["postgres"] = postgres / wall
        shares["writer"] = written["cpu_s"] / (warmup + seconds)
        committed = {p: (mono, clock) for p, mono, clock in written["committed"] if mono >= t0}
        windows.append((committed, wall, shares, finish_profile(profile) if profile else None))
    await asyncio.sleep(0.5)  # the last events reach everyone
    subs.send("stop")
    received = await receive(subs)
    subs_proc.join()
    runs = [{**latencies(committed, received["samples"]), "events": len(committed),
             "events_per_s": len(committed) / wall, "cpu_shares": shares, "profile": profile}
            for committed, wall, shares, profile in windows]
    median = sorted(runs, key=lambda run: run["delivery_p99_ms"])[len(runs) // 2]
    total_wall = sum(wall for _, wall, _, _ in windows)
    return {**median, "subscribers": args.subscribers, "rounds": runs, "probes": len(received["samples"]),
            "dropped": received["dropped"], "mib_per_s": received["bytes"] / total_wall / 2**20}


def latencies(committed: dict[int, tuple[float, float]], probes: list[list[tuple[int, float, float]]]
              ) -> dict[str, Any]:
    """Commit to the probes' sockets (kernel timestamps) and to their reading (the load generator's loop)."""
    at_socket: list[float] = []
    at_loop: list[float] = []
    missing = 0
    for samples in probes:
        seen = 0
        for position, arrived_at, read_at in samples:
            if position in committed:
                seen += 1
                at_socket.append(arrived_at - committed[position][1])
                at_loop.append(read_at - committed[position][0])
        missing += len(committed) - seen
    at_socket.sort()
    at_loop.sort()
    return {"delivery_p50_ms": percentile(at_socket, 0.50) * 1000,
            "delivery_p99_ms": percentile(at_socket, 0.99) * 1000,
            "delivery_max_ms": (at_socket[-1] if at_socket else float("nan")) * 1000,
            "read_p50_ms": percentile(at_loop, 0.50) * 1000, "read_p99_ms": percentile(at_loop, 0.99) * 1000,
            "missing": missing}


def runqueue_seconds(pid: int) -> float:
    """Time the process's main thread (the event loop) spent runnable but waiting for a CPU (Linux)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


async def head_of(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await head(conn)
    finally:
        await conn.close()


def unread_bytes(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])


async def eviction(server: psutil.Process, port: int, token: str, dsn: str, wallets: list[str],
                   rate: int) -> dict[str, Any]:
    """(c): a client that stops reading while events flow; when does the server let go of it?"""
    writer, writer_proc = spawn(writer_process, dsn, wallets, rate, 40.0, "commands")
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    local_port = sock.getsockname()[1]
    await loop.sock_sendall(sock, stream_request("127.0.0.1", port, token, "after=now"))
    frozen_at = time.monotonic()  # from here on it never reads again
    last_growth, unread = frozen_at, 0
    evicted_at = None
    try:
        async with asyncio.timeout(60):
            while evicted_at is None:
                await asyncio.sleep(0.005)  # both ends of the measured span are polled: keep it fine
                now = time.monotonic()
                if (pending := unread_bytes(sock)) > unread:
                    last_growth, unread = now, pending
                held = any(c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == local_port
                           for c in server.net_connections(kind="tcp"))
                if not held:
                    evicted_at = now
    finally:
        sock.close()
        writer.send("stop")
        with contextlib.suppress(Exception):
            await receive(writer, 60)
        writer_proc.join()
    return {"evict_s": evicted_at - last_growth, "evict_from_freeze_s": evicted_at - frozen_at,
            "frozen_unread_kib": unread / 1024}


# ---------------------------------------------------------------- profile (py-spy, optional)


def start_profile(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], str] | None:
    output = tempfile.mktemp(suffix=".txt", prefix="sse-profile-")  # noqa: S306 (py-spy writes it)
    try:
        proc = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                                 "-f", "raw", "-o", output, "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        return None
    return proc, output


def finish_profile(profile: tuple[subprocess.Popen[bytes], str] | None) -> list[tuple[str, float]] | None:
    """Share of samples per function (own time), from py-spy's collapsed stacks."""
    if profile is None:
        return None
    proc, output = profile
    proc.wait(60)
    own: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(FileNotFoundError), open(output) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            leaf = stack.split(";")[-1]
            name = re.sub(r" \((.*?/)?([^/]+\.py):\d+\)", r" (\2)", leaf)
            own[name] += int(count)
            total += int(count)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(output)
    return [(name, n / total) for name, n in own.most_common(15)] if total else None


# ---------------------------------------------------------------- main


@contextlib.asynccontextmanager
async def serving(dsn: str, streams: int, **settings: str) -> AsyncIterator[tuple[psutil.Process, int]]:
    """A `python -m backend serve` process on a free port, as ./scripts/serve starts it (here and in
    bench_fanout.py), with room for `streams` streams and these settings besides."""
    port = free_port()
    env = serve_env(dsn, port, SSE_MAX_STREAMS=str(streams), SSE_MAX_STREAMS_PER_KEY=str(streams),
                    AUTH_FAILURE_RATE_PER_S="0", **settings)  # waves of first requests with one uncached key
    proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env)  # noqa: ASYNC220
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        yield psutil.Process(proc.pid), port
    finally:
        proc.terminate()
        proc.wait(60)


async def measure(db: Server, args: argparse.Namespace) -> dict[str, Any]:
    seconds = 4.0 if args.quick else args.seconds
    idle = min(args.idle, 2000) if args.quick else args.idle
    async with fresh_database(db, "sse") as dsn:
        token = await admin_token(dsn)
        wallets = await seed_wallets(dsn, args.wallets)
        result: dict[str, Any] = {"started": datetime.now(UTC).isoformat()}
        async with serving(dsn, args.subscribers + 100) as (server, port):  # (a) and (c)
            result["event_loop"] = event_loop_of(await scrape(f"http://127.0.0.1:{port}", {}))
            result.update(await delivery(server, port, token, dsn, wallets, args, seconds, 3))
            result.update(await eviction(server, port, token, dsn, wallets, args.rate))
        async with serving(dsn, idle + 200) as (server, port):  # (b) on a fresh process: nothing freed to reuse
            result.update(await idle_memory(server, port, token, idle))
        result.update(await peer_idle_memory(idle))
        return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.followers:
        import bench_fanout

        return await bench_fanout.run(args)
    async with chosen_server(args.dsn) as db:
        r = await measure(db, args)
    print(f"server: {db.description}; {os.cpu_count()} cores; event loop {r['event_loop']} "
          f"(EVENT_LOOP: {os.environ.get('EVENT_LOOP', 'auto')})")
    print(f"(a) {r['subscribers']} subscribers, {args.rate} events/s ({args.writer}), {len(r['rounds'])} rounds "
          f"({r['probes']} probes, {sum(run['missing'] for run in r['rounds'])} events missing, "
          f"{r['dropped']} streams dropped, {r['mib_per_s']:.0f} MiB/s to clients)")
    for i, run in enumerate(r["rounds"], 1):
        print(f"    round {i}: {run['events_per_s']:.0f} events/s; commit -> client socket p50 "
              f"{run['delivery_p50_ms']:.1f} ms, p99 {run['delivery_p99_ms']:.1f} ms, "
              f"max {run['delivery_max_ms']:.1f} ms; -> read by the load generator p50 {run['read_p50_ms']:.1f} ms, "
              f"p99 {run['read_p99_ms']:.1f} ms")
    print(f"    median round: p50 {r['delivery_p50_ms']:.1f} ms, p99 {r['delivery_p99_ms']:.1f} ms")
    shares = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_shares"].items())
    print(f"    CPU (cores busy): {shares} (of {os.cpu_count()})")
    if r["profile"]:
        print("    server CPU by function (own time, py-spy):")
        for name, share in r["profile"]:
            print(f"      {share * 100:5.1f} %  {name}")
    print(f"(b) {r['idle_subscribers']} idle subscribers: server RSS {r['rss_before_mib']:.1f} -> "
          f"{r['rss_after_mib']:.1f} MiB = {r['rss_kib_per_idle_subscriber']:.1f} KiB each; a bare aiohttp-sse "
          f"handler, measured the same way: {r['peer_rss_kib_per_idle_subscriber']:.1f} KiB each")
    print(f"(c) frozen client evicted {r['evict_s']:.2f} s after its buffer stopped filling "
          f"({r['evict_from_freeze_s']:.2f} s after it stopped reading; {r['frozen_unread_kib']:.0f} KiB unread)")
    for target, met in (("delivery p99 <= 50 ms", r["delivery_p99_ms"] <= 50),
                        ("<= 16 KiB per idle subscriber", r["rss_kib_per_idle_subscriber"] <= 16),
                        ("eviction <= 10 s", r["evict_s"] <= 10)):
        print(f"target {target}: {'met' if met else 'NOT met'}")
    return {"bench": "sse", "subscribers": r["subscribers"], "events_per_s": round(r["events_per_s"], 1),
            "delivery_p50_ms": round(r["delivery_p50_ms"], 2), "delivery_p99_ms": round(r["delivery_p99_ms"], 2),
            "idle_subscribers": r["idle_subscribers"],
            "rss_kib_per_idle_subscriber": round(r["rss_kib_per_idle_subscriber"], 2),
            "evict_s": round(r["evict_s"], 2)}
