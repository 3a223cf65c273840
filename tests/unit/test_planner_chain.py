"""A request decided after earlier ones (AppendRequest.after) commits only if they all committed."""

from __future__ import annotations

import asyncio

from backend.store.encoding import encode_writes
from backend.store.events import AppendResult, NewEvent, PredecessorFailed, StreamAppended, Write
from backend.store.hashing import GENESIS
from backend.store.planner import AppendRequest, BatchPlanner


def request(expected: int, *after: AppendRequest) -> AppendRequest:
    writes, count, size = encode_writes([Write("wallet-a", expected, [NewEvent("Noted", {"n": expected})])])
    return AppendRequest(writes, count, size, None, asyncio.get_running_loop().create_future(), after)


def planner(version: int) -> BatchPlanner:
    return BatchPlanner({"wallet-a": (version, GENESIS)}, head=version, last_recorded_at=None)


async def test_a_follower_in_the_same_batch_fails_with_its_predecessor_even_if_its_version_matches() -> None:
    first = request(2)
    second = request(3, first)
    batch = planner(3)  # someone else wrote version 3: first (expecting 2) fails, second's 3 matches
    assert not isinstance(batch.plan(first), AppendResult)
    assert isinstance(batch.plan(second), PredecessorFailed)
    assert batch.rows == []


async def test_a_follower_in_the_same_batch_commits_after_its_predecessor() -> None:
    first = request(2)
    second = request(3, first)
    batch = planner(2)
    assert isinstance(batch.plan(first), AppendResult)
    outcome = batch.plan(second)
    assert isinstance(outcome, AppendResult) and outcome.streams[0].version == 4


async def test_a_follower_in_a_later_batch_goes_by_the_settled_outcome() -> None:
    committed, failed = request(2), request(2)
    committed.outcome = AppendResult((StreamAppended("wallet-a", (3,), 3),))
    failed.outcome = PredecessorFailed("wallet-a", 2, 3)
    assert isinstance(planner(3).plan(request(3, committed)), AppendResult)
    assert isinstance(planner(3).plan(request(3, failed)), PredecessorFailed)
    assert isinstance(planner(3).plan(request(3, request(2))), PredecessorFailed)  # never settled: not trusted
