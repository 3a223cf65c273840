"""The stored tree (merkle_nodes, merkle_state) and stored checkpoints: folding new events into it,
and answering roots and proofs from complete subtrees in one read each.

A fold step is one statement, `tally_merkle_fold` (migration 0011), whose transaction first locks
merkle_state's row: whoever folds (the leading folder, or an on-demand checkpoint catching up) waits
for the other and then continues from the size it finds, so a batch is folded exactly once. The
events are read after the stored size in position order; positions are gap-free and become visible
in order, so nothing is skipped. The database hashes the leaves and nodes itself, so folding costs
this process one round trip, not a SHA-256 per leaf and node. Appends never wait for any of this.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from backend.audit.merkle import (
    EMPTY_ROOT,
    Node,
    ProofError,
    assemble,
    consistency_ranges,
    inclusion_ranges,
    needed,
    plan,
    range_hash,
    subtrees,
)
from backend.audit.signing import Checkpoint, Signer
from backend.db import Connection
from backend.store.hashing import format_time
from backend.store.reads import Executor

log = logging.getLogger(__name__)

SIZE_SQL = "select tree_size from merkle_state"
SIZE_FOR_SIGNING_SQL = "select tree_size from merkle_state for update"
FOLD_SQL = "select tree_size, folded, gap_at from tally_merkle_fold($1)"
NODES_SQL = """
select n.level, n.index, n.hash from unnest($1::smallint[], $2::bigint[]) as w(level, index)
join merkle_nodes n on n.level = w.level and n.index = w.index
"""
CHECKPOINT_COLUMNS = "id, tree_size, root_hash, signed_at, key_id, signature"
INSERT_CHECKPOINT_SQL = f"""
insert into audit_checkpoints (tree_size, root_hash, signed_at, key_id, signature)
values ($1, $2, $3, $4, $5) returning {CHECKPOINT_COLUMNS}
"""
CHECKPOINTS_SQL = f"""
select {CHECKPOINT_COLUMNS} from audit_checkpoints where id < $1 order by id desc limit $2
"""
LATEST_CHECKPOINT_SQL = f"select {CHECKPOINT_COLUMNS} from audit_checkpoints order by id desc limit 1"


class TreeTooSmall(ProofError):
    """The folded tree does not reach the size asked for (yet)."""

    def __init__(self, asked: int, size: int) -> None:
        super().__init__(f"the tree has {size} leaves so far, not {asked}")
        self.asked = asked
        self.size = size


async def tree_size(db: Executor) -> int:
    return int(await db.fetchval(SIZE_SQL))


async def fetch_nodes(db: Executor, nodes: list[Node]) -> dict[Node, bytes]:
    if not nodes:
        return {}
    rows = await db.fetch(NODES_SQL, [level for level, _ in nodes], [index for _, index in nodes])
    return {(row[0], row[1]): bytes(row[2]) for row in rows}


async def complete(db: Executor, nodes: list[Node], size: int) -> Mapping[Node, bytes]:
    """The subtrees of a tree of `size` leaves, or TreeTooSmall when they are not all folded yet (the
    subtree holding leaf size - 1 is among them, so a missing one means the tree is smaller)."""
    found = await fetch_nodes(db, nodes)
    if len(found) != len(nodes):
        raise TreeTooSmall(size, await tree_size(db))
    return found


async def root(db: Executor, size: int) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    nodes = subtrees(0, size)
    return range_hash(nodes, await complete(db, nodes, size))


async def inclusion(db: Executor, index: int, size: int) -> tuple[bytes, list[bytes], bytes]:
    """(leaf hash, audit path, root) of leaf `index` in the tree of `size` leaves: one read."""
    parts = plan(inclusion_ranges(index, size))
    top = subtrees(0, size)
    hashes = await complete(db, needed([*parts, [(0, index)], top]), size)
    return hashes[(0, index)], assemble(parts, hashes), range_hash(top, hashes)


async def consistency(db: Executor, old: int, new: int) -> tuple[list[bytes], bytes, bytes]:
    """(audit path, old root, new root) proving the tree of `new` leaves extends that of `old`: one read."""
    parts = plan(consistency_ranges(old, new))
    old_top, new_top = subtrees(0, old), subtrees(0, new)
    hashes = await complete(db, needed([*parts, old_top, new_top]), new)
    return assemble(parts, hashes), range_hash(old_top, hashes), range_hash(new_top, hashes)


async def fold(conn: Connection, limit: int) -> tuple[int, int]:
    """Fold up to `limit` new events into the stored tree in one statement; return the tree's size and
    how many events were folded."""
    row = await conn.fetchrow(FOLD_SQL, limit)
    assert row is not None  # a function with OUT parameters answers one row
    size, folded, gap_at = int(row[0]), int(row[1]), row[2]
    if gap_at is not None:
        log.error("the log skips positions: the tree stops before the gap",
                  extra={"expected": size + 1, "found": gap_at})
    return size, folded


async def catch_up(conn: Connection, to: int, limit: int, max_batches: int | None = None) -> int:
    """Fold until the tree reaches position `to` (or the log ends short of it, or max_batches batches
    have been folded); return the size."""
    batches = 0
    while True:
        size, folded = await fold(conn, limit)
        batches += 1
        if size >= to or not folded or (max_batches is not None and batches >= max_batches):
            return size


async def sign(conn: Connection, signer: Signer) -> dict[str, Any]:
    """Sign the folded tree as it stands and store the checkpoint; return it as served.

    Under merkle_state's row lock, as folds take it: two signers (the leader's periodic checkpoint and
    an on-demand one) cannot cross, so a checkpoint with a later id and timestamp never covers fewer
    events than an earlier one, which an auditor would rightly read as the log shrinking."""
    async with conn.transaction():
        size = int(await conn.fetchval(SIZE_FOR_SIGNING_SQL))
        checkpoint = signer.sign(size, await root(conn, size), format_time(datetime.now(UTC)))
        row = await conn.fetchrow(INSERT_CHECKPOINT_SQL, checkpoint.tree_size, checkpoint.root_hash,
                                  datetime.fromisoformat(checkpoint.timestamp), checkpoint.key_id,
                                  checkpoint.signature)
    return served(row)


def served(row: Any) -> dict[str, Any]:
    checkpoint = Checkpoint(row["tree_size"], bytes(row["root_hash"]), format_time(row["signed_at"]),
                            row["key_id"], bytes(row["signature"]))
    return {"id": row["id"], **checkpoint.as_dict()}


async def checkpoints(db: Executor, before: int | None, limit: int) -> list[dict[str, Any]]:
    rows = await db.fetch(CHECKPOINTS_SQL, before if before is not None else 2**63 - 1, limit)
    return [served(row) for row in rows]


async def latest(db: Executor) -> dict[str, Any] | None:
    row = await db.fetchrow(LATEST_CHECKPOINT_SQL)
    return served(row) if row is not None else None
