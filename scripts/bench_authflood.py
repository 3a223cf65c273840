"""A legitimate client's latency alone, then during a flood of made-up API keys from another address.

A `serve` process (TRUSTED_PROXIES=127.0.0.1, so X-Forwarded-For tells the two clients apart) on a fresh
database. The legitimate client (own process, C connections, closed loop) reads wallets with a valid
key; the flood (own process, F connections, as fast as it can) sends each request with a new,
well-formed but unknown key. Each server setting runs a warm-up, the client alone, then client and
flood together. Settings: `limited` (the defaults: AUTH_FAILURE_RATE_PER_S=20, AUTH_FAILURE_BURST=100,
AUTH_FAILURE_HOLD_S=1), `unheld` (the same, 429s answered at once) and `unlimited`
(AUTH_FAILURE_RATE_PER_S=0: every made-up key is looked up), in one run. Reported: the
client's p50/p99 and requests/s, the flood's requests/s and answers, API key lookups per flood request
(the server's tally_api_key_lookups_total), committed transactions (pg_stat_database, which lags by up
to a second or so) and server CPU per flood request.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import time
from typing import Any

import aiohttp
import psutil
from bench_http import ROOT, admin_token, cpu_seconds, free_port, scrape, seed_wallets, serve_env, wait_ready
from bench_store import Server, chosen_server, connected, fresh_database, percentile

from backend.commands.api_keys import new_token

CLIENT, FLOODER = "192.0.2.10", "203.0.113.66"
SETTINGS = {"limited": {}, "unheld": {"AUTH_FAILURE_HOLD_S": "0"}, "unlimited": {"AUTH_FAILURE_RATE_PER_S": "0"}}
"""The defaults; the same without holding 429s back; no limit on failed authentications."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dsn", help="PostgreSQL server to create the bench database on")
    parser.add_argument("--seconds", type=float, default=10.0, help="each measured phase (default 10)")
    parser.add_argument("--connections", type=int, default=4, help="the legitimate client's connections")
    parser.add_argument("--flood-connections", type=int, default=32, help="the flood's connections")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"which server settings to run, in order (default: {','.join(SETTINGS)})")
    parser.add_argument("--quick", action="store_true", help="4 s phases")


# ---------------------------------------------------------------- the two clients (own processes)


async def legitimate(base: str, token: str, wallets: list[str], connections: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": CLIENT}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(base, headers=headers, connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            i = n
            while (started := time.perf_counter()) < stop_at:
                async with session.get(f"/v1/wallets/{wallets[i % len(wallets)]}") as reply:
                    await reply.read()
                    if reply.status != 200:
                        errors[str(reply.status)] = errors.get(str(reply.status), 0) + 1
                latencies.append(time.perf_counter() - started)
                i += connections

        await asyncio.gather(*(worker(n) for n in range(connections)))
    latencies.sort()
    return {"requests": len(latencies), "requests_per_s": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 0.5) * 1000, "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": latencies[-1] * 1000 if latencies else 0.0, "errors": errors}


async def flood(base: str, connections: int, seconds: float) -> dict[str, Any]:
    answers: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(base, headers={"X-Forwarded-For": FLOODER}, connector=connector) as session:
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop_at:
                headers = {"Authorization": f"Bearer {new_token()[1]}"}
                async with session.get("/v1/wallets", headers=headers) as reply:
                    await reply.read()
                    answers[reply.status] = answers.get(reply.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return {"requests": sum(answers.values()), "requests_per_s": sum(answers.values()) / seconds, "answers": answers}


def legitimate_process(conn: Any, *args: Any) -> None:
    conn.send(asyncio.run(legitimate(*args)))
    conn.close()


def flood_process(conn: Any, *args: Any) -> None:
    conn.send(asyncio.run(flood(*args)))
    conn.close()


def spawn(target: Any, *args: Any) -> tuple[Any, multiprocessing.process.BaseProcess]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=target, args=(child, *args))
    proc.start()
    return parent, proc


async def collect(conn: Any, proc: multiprocessing.process.BaseProcess) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(conn.recv)
    proc.join()
    return result


# ---------------------------------------------------------------- one server setting


async def committed(dsn: str) -> int:
    async with connected(dsn) as conn:
        return int(await conn.fetchval("select xact_commit from pg_stat_database where datname = current_database()"))


async def phase(base: str, dsn: str, server: psutil.Process, token: str, wallets: list[str],
                args: argparse.Namespace, seconds: float, with_flood: bool) -> dict[str, Any]:
    await asyncio.sleep(1.5)  # let pg_stat_database catch up with what came before
    before_metrics, before_xacts, before_cpu = await scrape(base, {}), await committed(dsn), cpu_seconds([server])
    started = time.perf_counter()
    client = spawn(legitimate_process, base, token, wallets, args.connections, seconds)
    flooder = spawn(flood_process, base, args.flood_connections, seconds) if with_flood else None
    result: dict[str, Any] = {"client": await collect(*client)}
    if flooder is not None:
        result["flood"] = await collect(*flooder)
    wall = time.perf_counter() - started
    cpu = cpu_seconds([server]) - before_cpu
    await asyncio.sleep(1.5)
    after_metrics, after_xacts = await scrape(base, {}), await committed(dsn)

    def delta(series: str) -> float:
        return after_metrics.get(series, 0.0) - before_metrics.get(series, 0.0)

    result.update(wall_s=wall, server_cpu_s=cpu, transactions=after_xacts - before_xacts,
                  lookups=int(delta("tally_api_key_lookups_total")),
                  refused=int(delta("tally_auth_refused_total")))
    return result


async def one_setting(db: Server, name: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    async with fresh_database(db, "authflood") as dsn:
        token = await admin_token(dsn)
        port = free_port()
        env = serve_env(dsn, port, TRUSTED_PROXIES="127.0.0.1", **SETTINGS[name])
        proc = subprocess.Popen([sys.executable, "-m", "backend", "serve"], cwd=ROOT, env=env)  # noqa: ASYNC220
        base = f"http://127.0.0.1:{port}"
        try:
            await wait_ready(base, proc)
            wallets = await seed_wallets(base, {"Authorization": f"Bearer {token}"}, 50)
            server = psutil.Process(proc.pid)
            await phase(base, dsn, server, token, wallets, args, 2.0, with_flood=False)  # warm-up
            alone = await phase(base, dsn, server, token, wallets, args, seconds, with_flood=False)
            flooded = await phase(base, dsn, server, token, wallets, args, seconds, with_flood=True)
        finally:
            proc.terminate()
            proc.wait(30)
    flood_requests = flooded["flood"]["requests"] or 1
    # What the flood added: the phase's total less what the client's requests cost when alone.
    client_requests = max(1, alone["client"]["requests"])
    extra_xacts = flooded["transactions"] - alone["transactions"] / client_requests * flooded["client"]["requests"]
    extra_cpu = flooded["server_cpu_s"] - alone["server_cpu_s"] / client_requests * flooded["client"]["requests"]
    return {
        "alone": alone, "flooded": flooded,
        "lookups_per_s": flooded["lookups"] / flooded["wall_s"],
        "extra_transactions_per_s": extra_xacts / flooded["wall_s"],
        "lookups_per_flood_request": flooded["lookups"] / flood_requests,
        "transactions_per_flood_request": extra_xacts / flood_requests,
        "server_cpu_ms_per_flood_request": extra_cpu / flood_requests * 1000,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 4.0 if args.quick else args.seconds
    names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = set(names) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown --settings {sorted(unknown)}; choose from {sorted(SETTINGS)}")
    results: dict[str, Any] = {}
    async with chosen_server(args.dsn) as db:
        for name in names:
            results[name] = await one_setting(db, name, args, seconds)
    print(f"server: {db.description}; legitimate client {args.connections} connections (wallet reads), "
          f"flood {args.flood_connections} connections (a new unknown key each), {seconds:g} s phases")
    summary: dict[str, Any] = {"bench": "authflood"}
    for name, r in results.items():
        alone, flooded = r["alone"]["client"], r["flooded"]["client"]
        f = r["flooded"]["flood"]
        print(f"{name}:")
        print(f"  client alone:       {alone['requests_per_s']:7.0f} requests/s, p50 {alone['p50_ms']:.2f} ms, "
              f"p99 {alone['p99_ms']:.2f} ms, errors {alone['errors'] or 0}")
        print(f"  client under flood: {flooded['requests_per_s']:7.0f} requests/s, p50 {flooded['p50_ms']:.2f} ms, "
              f"p99 {flooded['p99_ms']:.2f} ms, errors {flooded['errors'] or 0}")
        print(f"  flood: {f['requests_per_s']:.0f} requests/s, answers {dict(sorted(f['answers'].items()))}; "
              f"{r['lookups_per_s']:.0f} key lookups/s, ~{r['extra_transactions_per_s']:.0f} transactions/s more "
              "than the client's own")
        print(f"  per flood request: {r['lookups_per_flood_request']:.3f} key lookups, "
              f"~{r['transactions_per_flood_request']:.3f} transactions, "
              f"{r['server_cpu_ms_per_flood_request']:.3f} ms server CPU")
        summary[name] = {
            "alone_p50_ms": round(alone["p50_ms"], 2), "alone_p99_ms": round(alone["p99_ms"], 2),
            "flooded_p50_ms": round(flooded["p50_ms"], 2), "flooded_p99_ms": round(flooded["p99_ms"], 2),
            "flood_requests_per_s": round(f["requests_per_s"], 1), "lookups_per_s": round(r["lookups_per_s"], 1),
            "lookups_per_flood_request": round(r["lookups_per_flood_request"], 4),
            "transactions_per_flood_request": round(r["transactions_per_flood_request"], 3),
            "server_cpu_ms_per_flood_request": round(r["server_cpu_ms_per_flood_request"], 3),
        }
    return summary
