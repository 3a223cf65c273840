"""Coalesced point reads: concurrent reads share one query, and no caller's outcome is lost or orphaned."""

from __future__ import annotations

import asyncio

import pytest

from backend.store.coalesce import Coalescer


async def test_reads_queued_while_a_load_runs_share_the_next_load() -> None:
    release = asyncio.Event()
    loads: list[list[str]] = []

    async def load(keys: list[str]) -> dict[str, int]:
        loads.append(keys)
        if len(loads) == 1:
            await release.wait()
        return {key: len(key) for key in keys}

    coalescer: Coalescer[str, int] = Coalescer(load, int, max_in_flight=1)
    first = asyncio.create_task(coalescer.get("a"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(coalescer.get(key)) for key in ("bb", "ccc", "bb")]
    await asyncio.sleep(0)
    release.set()
    assert await first == 1
    assert await asyncio.gather(*others) == [2, 3, 2]
    assert loads == [["a"], ["bb", "ccc"]]  # asked after the first load started: answered by a later one


async def test_a_loader_cancelled_mid_load_hands_the_others_to_the_next_load_and_drops_its_own_read() -> None:
    """Its own read is not loaded again: answered later, an error would sit in a future nobody awaits."""
    started = asyncio.Event()
    loads: list[list[str]] = []

    async def load(keys: list[str]) -> dict[str, int]:
        loads.append(keys)
        if len(loads) == 1:
            started.set()
            await asyncio.Event().wait()  # until cancelled
        raise RuntimeError("the pool is closing")

    coalescer: Coalescer[str, int] = Coalescer(load, int, max_in_flight=1)
    loader = asyncio.create_task(coalescer.get("a"))
    await started.wait()
    waiting = asyncio.create_task(coalescer.get("b"))
    await asyncio.sleep(0)
    loader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loader
    with pytest.raises(RuntimeError):
        await waiting
    assert loads == [["a"], ["b"]]
