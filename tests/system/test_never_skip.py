"""Readers never skip: with several processes appending at once, a tailing reader sees every position in order."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import asyncpg
import pytest

from backend.store import reads
from tests.conftest import ROOT

pytestmark = pytest.mark.system

PROCESSES = 4
SECONDS = 4.0


async def test_tailing_reader_sees_a_gapless_increasing_sequence(database_url: str, pool: asyncpg.Pool) -> None:
    start = await reads.head(pool)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.system.appender", database_url, str(SECONDS), "8",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    seen: list[int] = []
    last = start

    async def tail_once() -> None:
        nonlocal last
        for event in await reads.read_all(pool, last, limit=500):
            # Positions are gap-free, so never skipping means each event is exactly the next one.
            assert event.position == last + 1, f"reader at {last} saw {event.position}: an event was skipped"
            seen.append(event.position)
            last = event.position

    while any(p.returncode is None for p in procs):
        await tail_once()
        await asyncio.sleep(0)
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(p.wait()), 0.001)
    outputs = [int((await p.communicate())[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    await tail_once()
    await tail_once()

    rows = await pool.fetch("select position from events where position > $1 order by 1", start)
    table = [r["position"] for r in rows]
    assert seen == table
    assert len(seen) == sum(outputs)
    assert len(seen) > 1000, "the appenders should have produced a real load"
