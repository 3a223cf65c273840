"""Coalesced point reads: concurrent reads share one query, and no caller's outcome is lost or orphaned."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from backend.store.coalesce import Coalescer


class Loader:
    """A load function that records the keys of each load; the first load says it started and then
    waits for `release` (set it, or cancel the load); `answer` makes each load's result."""

    def __init__(self, answer: Callable[[list[str]], dict[str, int]]) -> None:
        self.answer = answer
        self.loads: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, keys: list[str]) -> dict[str, int]:
        self.loads.append(keys)
        if len(self.loads) == 1:
            self.started.set()
            await self.release.wait()
        return self.answer(keys)


async def test_reads_queued_while_a_load_runs_share_the_next_load() -> None:
    load = Loader(lambda keys: {key: len(key) for key in keys})
    coalescer: Coalescer[str, int] = Coalescer(load, int, max_in_flight=1)
    first = asyncio.create_task(coalescer.get("a"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(coalescer.get(key)) for key in ("bb", "ccc", "bb")]
    await asyncio.sleep(0)
    load.release.set()
    assert await first == 1
    assert await asyncio.gather(*others) == [2, 3, 2]
    assert load.loads == [["a"], ["bb", "ccc"]]  # asked after the first load started: answered by a later one


def closing(keys: list[str]) -> dict[str, int]:
    raise RuntimeError("the pool is closing")


async def test_a_loader_cancelled_mid_load_hands_the_others_to_the_next_load_and_drops_its_own_read() -> None:
    """Its own read is not loaded again: answered later, an error would sit in a future nobody awaits."""
    load = Loader(closing)  # the first load is never released: it waits until cancelled
    coalescer: Coalescer[str, int] = Coalescer(load, int, max_in_flight=1)
    loader = asyncio.create_task(coalescer.get("a"))
    await load.started.wait()
    waiting = asyncio.create_task(coalescer.get("b"))
    await asyncio.sleep(0)
    loader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loader
    with pytest.raises(RuntimeError):
        await waiting
    assert load.loads == [["a"], ["b"]]
