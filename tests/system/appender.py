"""A separate OS process that appends as fast as it can for a while (used by the never-skip test)."""

from __future__ import annotations

import asyncio
import random
import sys
import time

import asyncpg

from backend.db import pool_options
from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent, Write


async def main(dsn: str, seconds: float, tasks: int) -> int:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, **pool_options())
    assert pool is not None
    store = EventStore(pool)
    deadline = time.monotonic() + seconds
    streams = [f"skip-{random.getrandbits(48):x}-{i}" for i in range(20)]
    appended = 0

    async def worker() -> None:
        nonlocal appended
        while time.monotonic() < deadline:
            picked = random.sample(streams, random.choice([1, 1, 2]))
            writes = [Write(s, ANY, [NewEvent("Tick", {"n": appended})]) for s in picked]
            await store.append(writes)
            appended += len(writes)

    await asyncio.gather(*(worker() for _ in range(tasks)))
    await store.close()
    await pool.close()
    return appended


if __name__ == "__main__":
    print(asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))))
