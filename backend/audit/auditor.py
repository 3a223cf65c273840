"""The auditor's side of the tree, with no database: checking a signed checkpoint against an export,
asking a server for proofs and checking them against signed roots, and locating the first leaf that
differs from a checkpoint by bisecting with inclusion proofs (docs/AUDIT.md).

Nothing the server answers is trusted: every proof is checked against a root from a checkpoint whose
signature has been verified with the auditor's copy of the public key.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from backend.audit.merkle import Frontier, inclusion_ranges, leaf_hash, verify_consistency, verify_inclusion
from backend.audit.signing import Checkpoint, CheckpointFormatError, SigningKeyError, load_public_key
from backend.audit.verify import Batch
from backend.store.events import MAX_POSITION

BAD_HASH = bytes(32)


class AuditError(Exception):
    """Could not check (the server unreachable or answering an error, a file unreadable): exit 2."""


class ServerTreeMismatch(Exception):
    """A proof from the server does not verify against the signed root it must lead to."""


def load_checkpoint(data: bytes, origin: str) -> tuple[Checkpoint, dict[str, Any]]:
    try:
        document = orjson.loads(data)
        return Checkpoint.from_dict(document), document
    except (orjson.JSONDecodeError, CheckpointFormatError) as exc:
        raise AuditError(f"{origin}: not a checkpoint ({exc})") from None


def public_key_for(document: dict[str, Any], pinned: bytes | None) -> Ed25519PublicKey:
    """The auditor's pinned key (--public-key) or else the key `audit checkpoint` stored in the file."""
    source = pinned if pinned is not None else str(document.get("public_key", "")).encode()
    if not source:
        raise AuditError("no public key: give --public-key (the file holds none)")
    try:
        return load_public_key(source)
    except SigningKeyError as exc:
        raise AuditError(f"public key: {exc}") from None


def leaf_of(position: int, stored: str) -> bytes:
    """A row's leaf; a position no log has (0, negative, beyond 8 bytes) becomes position 0, which no
    tree holds, so the row differs like any renumbered one instead of stopping the check."""
    try:
        event_hash = bytes.fromhex(stored)
    except (TypeError, ValueError):
        event_hash = BAD_HASH
    return leaf_hash(position if 0 < position <= MAX_POSITION else 0, event_hash)


@dataclass(slots=True)
class LeafCollector:
    """Leaf hashes of the export's rows, in file order, up to the checkpoint's size: row i is leaf i,
    its leaf bytes holding the position the row carries (a renumbered or missing row differs)."""

    limit: int
    leaves: list[bytes] = field(default_factory=list)
    rows: int = 0

    def add(self, batch: Batch) -> None:
        room = self.limit - len(self.leaves)
        if room > 0:
            self.leaves.extend([leaf_of(row[0], row[6]) for row in batch[:room]])
        self.rows += len(batch)


async def collecting(batches: AsyncIterable[Batch], collector: LeafCollector) -> AsyncIterator[Batch]:
    async for batch in batches:
        collector.add(batch)
        yield batch


def root_of(leaves: Sequence[bytes]) -> bytes:
    frontier = Frontier()
    frontier.extend(leaves)
    return frontier.root()


@dataclass(slots=True)
class TreeCheck:
    """How an export compares with a checkpoint."""

    tree_size: int
    root_hash: str
    timestamp: str
    key_id: str
    signature_ok: bool
    export_leaves: int = 0
    root_ok: bool = False
    first_differing_position: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.signature_ok and self.root_ok

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}


def compare(checkpoint: Checkpoint, leaves: list[bytes]) -> TreeCheck:
    check = TreeCheck(checkpoint.tree_size, checkpoint.root_hash.hex(), checkpoint.timestamp, checkpoint.key_id,
                      signature_ok=True, export_leaves=len(leaves))
    if len(leaves) < checkpoint.tree_size:
        check.detail = (f"the export has {len(leaves)} events where the checkpoint covers {checkpoint.tree_size}")
        return check
    if root_of(leaves[:checkpoint.tree_size]) == checkpoint.root_hash:
        check.root_ok = True
        check.detail = f"the export's first {checkpoint.tree_size} events give the checkpoint's root"
    else:
        check.detail = f"the export's first {checkpoint.tree_size} events do not give the checkpoint's root"
    return check


class Client:
    """GETs to a Tally server with an API key, each answer JSON or an AuditError naming the problem."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def get(self, path: str, **params: int) -> Any:
        try:
            async with self.session.get(self.url + path, params=params, headers=self.headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise AuditError(f"GET {path}: {response.status} {problem_text(body)}")
                return orjson.loads(body)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise AuditError(f"GET {self.url}{path}: {exc.__class__.__name__}: {exc}") from None

    async def inclusion(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        proof = await self.get("/v1/audit/proofs/inclusion", position=index + 1, tree_size=size)
        return bytes.fromhex(proof["leaf_hash"]), [bytes.fromhex(h) for h in proof["audit_path"]]

    async def consistency(self, old: int, new: int) -> list[bytes]:
        proof = await self.get("/v1/audit/proofs/consistency", first=old, second=new)
        return [bytes.fromhex(h) for h in proof["audit_path"]]


def problem_text(body: bytes) -> str:
    try:
        problem = orjson.loads(body)
        return f"{problem.get('code')}: {problem.get('detail')}"
    except (orjson.JSONDecodeError, AttributeError):
        return body[:200].decode(errors="replace")


def first_difference_offline(checkpoint: Checkpoint, baseline: Sequence[bytes], leaves: Sequence[bytes]) -> int | None:
    """The index of the first leaf of `leaves` that differs from `baseline` (an earlier export's leaves),
    once `baseline` is shown to give the checkpoint's root; None when it does not."""
    size = checkpoint.tree_size
    if len(baseline) < size or root_of(baseline[:size]) != checkpoint.root_hash:
        return None
    for index in range(size):
        if index >= len(leaves) or leaves[index] != baseline[index]:
            return index
    return None


async def first_difference(client: Client, checkpoint: Checkpoint, leaves: Sequence[bytes]) -> int:
    """The index of the first leaf of `leaves` that differs from the tree the checkpoint signed.

    Each step asks for the inclusion proof of the first leaf not yet known to match, checks it against
    the signed root (which authenticates that leaf and every sibling subtree on its path), and moves to
    the leftmost sibling subtree whose hash the export does not reproduce: the range halves each time,
    so this takes O(log n) proofs. Raises ServerTreeMismatch when a proof does not verify: the server's
    stored tree no longer matches its own checkpoint either."""
    size, root = checkpoint.tree_size, checkpoint.root_hash
    low = 0
    while True:
        leaf, path = await client.inclusion(low, size)
        if not verify_inclusion(low, size, leaf, path, root):
            raise ServerTreeMismatch(f"the server's inclusion proof of position {low + 1} does not verify "
                                     f"against the checkpoint's root")
        if low >= len(leaves) or leaves[low] != leaf:
            return low
        for (start, end), expected in sorted(zip(inclusion_ranges(low, size), path, strict=True)):
            if start <= low:
                continue
            if end > len(leaves) or root_of(leaves[start:end]) != expected:
                low = start
                break
        else:
            raise ServerTreeMismatch("every subtree matches the export, yet the root does not")


async def check_consistency(client: Client, old: Checkpoint, new: Checkpoint) -> tuple[bool, str]:
    if old.tree_size > new.tree_size:
        return False, f"OLD covers {old.tree_size} events, more than NEW's {new.tree_size}: give them in order"
    if old.tree_size == new.tree_size:
        same = old.root_hash == new.root_hash
        return same, "same size and root" if same else "same size, different roots: the log was rewritten"
    if old.tree_size == 0:
        return True, "OLD is the empty tree"
    path = await client.consistency(old.tree_size, new.tree_size)
    if verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path):
        return True, f"the tree of {new.tree_size} events extends the tree of {old.tree_size}"
    return False, (f"the server proves no consistency from {old.tree_size} to {new.tree_size}: NEW does not "
                   f"extend OLD (an event at or before position {old.tree_size} changed)")
