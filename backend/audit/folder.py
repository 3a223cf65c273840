"""The background folder: one leader across all processes keeps the stored Merkle tree at the log's
head and, with a signing key, signs a checkpoint every AUDIT_CHECKPOINT_S.

It leads while it holds a session advisory lock on its own connection (projections.leader.leading,
as projection runners do), so a dead process hands the lead over at once; the others stand by and
retry. It follows the log after appends commit and on its own connection, with synchronous_commit
off (a crash loses only folded batches, which are folded again from the durable log), so appends
never wait for it.

It folds at most once every FOLD_INTERVAL_S while it keeps up: a fold is a transaction whatever it
carries, and folding after every commit (tens a second under load) cost the serving process several
percent of its CPU per command (docs/PERFORMANCE.md). The fold itself, hashing included, runs in the
database (tree_store.fold).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from backend.audit import tree_store
from backend.audit.signing import Signer
from backend.store.listener import Listener
from projections import leader
from projections.leader import Connect

log = logging.getLogger(__name__)

LEADER = 0x7A11_0007
"""Advisory lock namespace of "folds the Merkle tree" (0x7A11_0005 and _0006 are the projections')."""
NAME = "merkle"
TASK = "merkle-folder"
"""Its name among the process's supervised tasks (/health/ready, tally_background_task_restarts_total)."""
FOLD_INTERVAL_S = 1.0
"""The shortest time between two folds that keep up with the head (the tree lags it by about that; a
checkpoint asked for over HTTP folds up to the head itself)."""


@dataclass(eq=False)
class Folder:
    connect: Connect
    listener: Listener
    signer: Signer | None = field(kw_only=True)
    checkpoint_s: float = field(kw_only=True)
    batch_size: int = field(kw_only=True)
    standby_retry_s: float = field(default=1.0, kw_only=True)
    fold_interval_s: float = field(default=FOLD_INTERVAL_S, kw_only=True)
    leading: bool = field(default=False, init=False)
    size: int = field(default=0, init=False)
    signed: int = field(default=0, init=False)

    async def run(self) -> None:
        """One connection's lifetime: connect, win the lock (or stand by), lead until cancelled.

        Whatever ends it early (an outage, a bug, a broken log) is raised, for the process's
        Supervisor to log, count and start another run with backoff, as it does for the projection
        runners; the connection, and with it the lead, goes at once."""
        async with leader.leading(self.connect, f"tally-{TASK}", LEADER, NAME, self.standby_retry_s) as conn:
            try:
                await self._lead(conn)
            finally:
                self.leading = False

    async def _lead(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        self.leading = True
        log.info("merkle folder leading")
        next_checkpoint = time.monotonic()  # a new leader signs at once, then every checkpoint_s
        while True:
            folded_at = time.monotonic()
            self.size, folded = await tree_store.fold(conn, self.batch_size)
            now = time.monotonic()
            if self.signer is not None and now >= next_checkpoint:  # on time even while catching up
                await tree_store.sign(conn, self.signer)
                self.signed += 1
                next_checkpoint = now + self.checkpoint_s
            if folded == self.batch_size:
                continue  # behind: keep folding before waiting
            wait = max(0.0, min(next_checkpoint - now if self.signer is not None else 5.0, 5.0))
            if not folded and self.listener.head > self.size:
                await asyncio.sleep(min(wait, 0.5))  # not visible yet (or a gap): do not spin
            else:
                await self.listener.wait_beyond(self.size, wait)
            pause = folded_at + self.fold_interval_s - time.monotonic()
            if pause > 0:  # let the commits of the next moment gather into one fold
                await asyncio.sleep(pause)
