"""The host's table of per-key limits (backend/shared_limits.py): two workers' views of one real
file, as two processes of `serve --workers 2` map it (the system test runs the real thing)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import shared_limits
from backend.shared_limits import SharedLimits


@pytest.fixture
def table() -> Iterator[Path]:
    path = shared_limits.create(2, slots=64)
    try:
        yield path
    finally:
        shared_limits.remove(path)
    assert not path.parent.exists()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_two_workers_spend_one_bucket(table: Path) -> None:
    clock = Clock()
    one = SharedLimits(table, 0, rate_per_s=10, burst=4, clock=clock)
    two = SharedLimits(table, 1, rate_per_s=10, burst=4, clock=clock)
    try:
        assert [one.acquire("k"), two.acquire("k"), one.acquire("k"), two.acquire("k")] == [0.0] * 4
        assert two.acquire("k") == pytest.approx(0.1)
        assert one.acquire("other") == 0.0  # another key has its own bucket
        clock.now += 0.25  # 2.5 tokens back
        assert [one.acquire("k"), two.acquire("k")] == [0.0, 0.0]
        assert one.acquire("k") == pytest.approx(0.05)
    finally:
        one.close()
        two.close()


def test_the_stream_cap_counts_every_worker_and_a_restarted_worker_forgets_its_own(table: Path) -> None:
    one = SharedLimits.open(table, 0, rate_per_s=10, burst=4)
    two = SharedLimits.open(table, 1, rate_per_s=10, burst=4)
    try:
        assert [one.open_stream("k", 3), two.open_stream("k", 3), two.open_stream("k", 3)] == [True] * 3
        assert one.open_stream("k", 3) is False and two.open_stream("k", 3) is False
        assert one.open_streams("k") == 3
        one.close_stream("k")
        assert two.open_stream("k", 3) is True
        assert two.open_streams("k") == 3
        again = SharedLimits.open(table, 1, rate_per_s=10, burst=4)  # worker 1 died and was started again
        assert again.open_streams("k") == 0
        again.close()
    finally:
        one.close()
        two.close()


def test_a_full_idle_slot_is_reused_and_a_full_table_falls_back(table: Path) -> None:
    clock = Clock()
    limits = SharedLimits(table, 0, rate_per_s=10, burst=1, clock=clock)
    try:
        placed = 0
        while limits.acquire(f"key-{placed}") == 0.0:  # until a key finds no slot within MAX_PROBE
            placed += 1
        assert 32 <= placed < 64 and limits.overflows == 1
        assert limits.open_stream(f"key-{placed}", 1) is None
        clock.now += 0.1  # every bucket is full again: as good as no bucket
        assert limits.acquire(f"key-{placed}") == 0.0
        assert limits.acquire(f"key-{placed}") == pytest.approx(0.1)
    finally:
        limits.close()


def test_a_file_that_is_no_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "limits"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a limits table"):
        SharedLimits(path, 0, rate_per_s=1, burst=1)


def test_a_table_left_by_a_killed_parent_is_swept_and_a_running_ones_is_not(tmp_path: Path) -> None:
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    tables = {}
    for name, pid in (("dead", dead_pid.pid), ("alive", os.getpid())):
        directory = tmp_path / f"{shared_limits.PREFIX}{pid}-{name}"
        directory.mkdir()
        (directory / shared_limits.FILE_NAME).write_bytes(b"table")
        tables[name] = directory
    (tmp_path / f"{shared_limits.PREFIX}not-a-pid").mkdir()
    assert shared_limits.sweep(tmp_path) == [tables["dead"]]
    assert not tables["dead"].exists()
    assert (tables["alive"] / shared_limits.FILE_NAME).exists()
    assert (tmp_path / f"{shared_limits.PREFIX}not-a-pid").exists()


def test_a_new_table_is_named_after_its_parent(table: Path) -> None:
    assert table.parent.name.startswith(f"{shared_limits.PREFIX}{os.getpid()}-")
