"""The per-key limits of one host, shared by the workers of `serve --workers N`.

Each worker is its own process, so an in-process token bucket or stream count would let a key have N
times its limit on a host. The parent creates one file in a private temporary directory before it
starts the workers; each worker maps it (mmap, MAP_SHARED) and takes an exclusive `flock` on it around
each update. Why this engine and not another:

- The kernel's shared memory and file locks need no extra process, survive no reboot (a tmp file of
  the parent's), and cost two system calls per request (`bench.py limits`); PostgreSQL would add a
  round trip to every request, and a home-made broker or cluster protocol is out of the question.
- A lock taken with `flock` is released by the kernel when its holder dies, so a worker killed while
  holding it blocks nobody. A dead worker's open streams are forgotten by the worker started in its
  place (it clears its own column first: `SharedLimits.open`).

The table is a fixed array of slots, found by a 64-bit BLAKE2b digest of the key id (Python's `hash`
differs between processes) and linear probing. A slot holds a token bucket (tokens, last update on
the host's monotonic clock, which every process shares) and one open-stream count per worker. A slot
whose bucket is full again and that has no open stream is the same as no slot: it is reused for
another key. When no slot is free within `MAX_PROBE` of a key's place (many more active keys than
slots), that key falls back to this process's own bucket and stream count, as with one worker.

Limits are per host: several hosts behind a load balancer allow up to hosts x the limit (README,
"How limits behave across hosts").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MAGIC = b"TALLYLIM"
HEADER = struct.Struct("<8sII")  # magic, slots, workers
BUCKET = struct.Struct("<Qdd")  # key digest (0: never used), tokens, updated (monotonic seconds)
DIGEST = struct.Struct("<Q")
COUNT = struct.Struct("<I")
SLOTS = 16_384
MAX_PROBE = 32
FILE_NAME = "limits"


def slot_size(workers: int) -> int:
    return BUCKET.size + COUNT.size * workers


PREFIX = "tally-limits-"


def create(workers: int, slots: int = SLOTS) -> Path:
    """The parent's part: a zeroed table for `workers` workers in a new private directory named after
    this process (the caller removes it, `remove`, when the workers are gone; one left by a parent that
    was killed is removed by the next `create` on the host, `sweep`)."""
    sweep()
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    path = directory / FILE_NAME
    with path.open("wb") as file:
        file.write(HEADER.pack(MAGIC, slots, workers))
        file.truncate(HEADER.size + slots * slot_size(workers))
    return path


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.rmdir(path.parent)


def sweep(root: Path | None = None) -> list[Path]:
    """Remove the tables of parents that no longer run (killed with SIGKILL, they could not remove
    their own); the directories removed. A worker still holding one keeps its mapping."""
    removed = []
    for directory in (root or Path(tempfile.gettempdir())).glob(f"{PREFIX}*-*"):
        pid = directory.name.removeprefix(PREFIX).partition("-")[0]
        if not pid.isdigit() or _running(int(pid)) or directory.stat().st_uid != os.getuid():
            continue
        with contextlib.suppress(OSError):
            remove(directory / FILE_NAME)
            removed.append(directory)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: running
    return True


def digest(key: str) -> int:
    value: int = DIGEST.unpack(hashlib.blake2b(key.encode(), digest_size=8).digest())[0]
    return value or 1  # 0 marks a slot never used


class SharedLimits:
    """One worker's view of the host's table: token buckets and open-stream counts by key."""

    def __init__(self, path: Path, worker: int, *, rate_per_s: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(self._fd, 0)
            magic, self.slots, self.workers = HEADER.unpack_from(self._map, 0)
            if magic != MAGIC or not 0 <= worker < self.workers:
                raise ValueError(f"{path} is not a limits table for worker {worker}")
        except BaseException:
            os.close(self._fd)
            raise
        self.worker = worker
        self.rate = rate_per_s
        self.burst = burst
        self.refill_s = burst / rate_per_s if rate_per_s > 0 else 0.0
        self.clock = clock
        self._size = slot_size(self.workers)
        self._mine = BUCKET.size + COUNT.size * worker
        self.overflows = 0
        """Requests for a key that found no slot (then this process's own limits apply)."""

    @classmethod
    def open(cls, path: Path, worker: int, *, rate_per_s: float, burst: int) -> SharedLimits:
        """Map the table and forget the open streams a previous process in this worker's place left."""
        limits = cls(path, worker, rate_per_s=rate_per_s, burst=burst)
        with limits._locked():
            for slot in range(limits.slots):
                COUNT.pack_into(limits._map, limits._offset(slot) + limits._mine, 0)
        return limits

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def _offset(self, slot: int) -> int:
        return HEADER.size + slot * self._size

    def _locked(self) -> _Lock:
        return _Lock(self._fd)

    def _find(self, key: str, now: float, create: bool) -> int:
        """The offset of the key's slot (made when `create` and none exists), or -1."""
        wanted = digest(key)
        start = wanted % self.slots
        free = -1
        for probe in range(MAX_PROBE):
            offset = self._offset((start + probe) % self.slots)
            found, _, updated = BUCKET.unpack_from(self._map, offset)
            if found == wanted:
                return offset
            if found == 0:  # never used: the key is not further along
                if free < 0:
                    free = offset
                break
            if free < 0 and now - updated >= self.refill_s and not self._streams(offset):
                free = offset  # full again and no stream open: as good as empty
        if free >= 0 and create:
            BUCKET.pack_into(self._map, free, wanted, float(self.burst), now)
            for worker in range(self.workers):
                COUNT.pack_into(self._map, free + BUCKET.size + COUNT.size * worker, 0)
            return free
        return -1

    def _streams(self, offset: int) -> int:
        return sum(COUNT.unpack_from(self._map, offset + BUCKET.size + COUNT.size * w)[0]
                   for w in range(self.workers))

    def acquire(self, key: str) -> float | None:
        """Take one token of the key's bucket: 0.0 when allowed, else the seconds until one is
        available; None when the key found no slot."""
        now = self.clock()
        with self._locked():
            offset = self._find(key, now, True)
            if offset < 0:
                self.overflows += 1
                return None
            found, tokens, updated = BUCKET.unpack_from(self._map, offset)
            tokens = min(float(self.burst), tokens + max(0.0, now - updated) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            BUCKET.pack_into(self._map, offset, found, tokens, now)
        return wait

    def refund(self, key: str) -> None:
        with self._locked():
            offset = self._find(key, self.clock(), False)
            if offset >= 0:
                found, tokens, updated = BUCKET.unpack_from(self._map, offset)
                BUCKET.pack_into(self._map, offset, found, min(float(self.burst), tokens + 1.0), updated)

    def open_stream(self, key: str, cap: int) -> bool | None:
        """Count one more open stream of the key on this worker if the host holds fewer than `cap`:
        whether it did; None when the key found no slot."""
        with self._locked():
            offset = self._find(key, self.clock(), True)
            if offset < 0:
                self.overflows += 1
                return None
            if self._streams(offset) >= cap:
                return False
            mine = offset + self._mine
            COUNT.pack_into(self._map, mine, COUNT.unpack_from(self._map, mine)[0] + 1)
        return True

    def close_stream(self, key: str) -> None:
        with self._locked():
            offset = self._find(key, self.clock(), False)
            if offset >= 0:
                mine = offset + self._mine
                COUNT.pack_into(self._map, mine, max(0, COUNT.unpack_from(self._map, mine)[0] - 1))

    def open_streams(self, key: str) -> int:
        """The key's open streams on the whole host (for tests and metrics)."""
        with self._locked():
            offset = self._find(key, self.clock(), False)
            return self._streams(offset) if offset >= 0 else 0


class _Lock:
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
