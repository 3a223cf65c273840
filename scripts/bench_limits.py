"""Per-key limits: what the host's shared table (serve --workers N) costs per request against the process's own.

Each operation runs in a loop, timed (best of 5 repeats): a token taken from a key's bucket in this
process's RateLimiter (one worker) and in the shared table (`backend/shared_limits.py`, an
mmap and an flock: several workers), and a stream counted in and out of the shared table.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend import shared_limits  # noqa: E402
from backend.http.ratelimit import RateLimiter  # noqa: E402
from backend.shared_limits import SharedLimits  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=50_000, help="calls per timed repeat (default 50,000)")
    parser.add_argument("--workers", type=int, default=2, help="workers the shared table is made for (default 2)")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    path = shared_limits.create(args.workers)
    shared = SharedLimits.open(path, 0, rate_per_s=1e12, burst=2**40)
    local = RateLimiter(1e12, 2**40)

    def stream() -> None:
        shared.open_stream("key-1", 10)
        shared.close_stream("key-1")

    cases = {"process_bucket_us": lambda: local.acquire("key-1"),
             "shared_bucket_us": lambda: shared.acquire("key-1"),
             "shared_stream_open_close_us": stream}
    try:
        result = {name: min(timeit.repeat(case, number=args.calls, repeat=5)) / args.calls * 1e6
                  for name, case in cases.items()}
    finally:
        shared.close()
        shared_limits.remove(path)
    for name, micros in result.items():
        print(f"{name}: {micros:.2f}")
    return {"bench": "limits", **{name: round(micros, 2) for name, micros in result.items()}}
