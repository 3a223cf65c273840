"""The auditor's side of the tree, with no database: checking a signed checkpoint against an export,
asking a server for proofs and checking them against signed roots, and locating the first leaf that
differs from a checkpoint by bisecting with inclusion proofs (docs/AUDIT.md).

Nothing the server answers is trusted: every proof is checked against a root from a checkpoint whose
signature has been verified with the auditor's copy of the public key.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from backend.audit.merkle import Frontier, inclusion_ranges, leaf_hash, verify_consistency, verify_inclusion
from backend.audit.signing import HEX64, Checkpoint, CheckpointFormatError, SigningKeyError, load_public_key
from backend.audit.verify import Batch
from backend.db import mask_dsn
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
    """GETs to a Tally server with an API key, each answer JSON or an AuditError naming the problem
    in one line (never the key, nor a password in the URL)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str | None) -> None:
        if key is not None and not API_KEY.fullmatch(key):
            raise AuditError("the API key (--key or TALLY_API_KEY) holds spaces or control characters: "
                             "no Tally key does")
        self.session = session
        self.url = url.rstrip("/")
        self.shown = mask_dsn(self.url)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def get(self, path: str, **params: int) -> Any:
        body = await self.fetch(path, params)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise AuditError(f"GET {path}: the answer is not JSON ({excerpt(body)})") from None

    async def fetch(self, path: str, params: dict[str, int]) -> bytes:
        try:
            async with self.session.get(self.url + path, params=params, headers=self.headers) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            text = f"{exc.__class__.__name__}: {exc}".replace(self.url, self.shown)
            raise AuditError(f"GET {self.shown}{path}: {excerpt(text.encode())}") from None
        if response.status != 200:
            raise AuditError(f"GET {path}: {response.status} {problem_text(body)}")
        return body

    async def proof(self, path: str, *fields: str, **params: int) -> list[Any]:
        """The answer's `fields`, each a hash (64 hex digits) or a list of them, as bytes."""
        answer = await self.get(path, **params)
        try:
            return [hash_list(answer[name]) if isinstance(answer[name], list) else hex_hash(answer[name])
                    for name in fields]
        except (KeyError, TypeError, ValueError) as exc:
            raise AuditError(f"GET {path}: the answer is not a Tally proof ({excerpt(repr(exc).encode())})") from None

    async def inclusion(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        leaf, path = await self.proof("/v1/audit/proofs/inclusion", "leaf_hash", "audit_path",
                                      position=index + 1, tree_size=size)
        return leaf, path

    async def consistency(self, old: int, new: int) -> list[bytes]:
        (path,) = await self.proof("/v1/audit/proofs/consistency", "audit_path", first=old, second=new)
        return list(path)

    async def public_key(self) -> Ed25519PublicKey:
        path = "/v1/audit/public-key"
        answer = await self.get(path)
        served = answer.get("public_key_hex") if isinstance(answer, dict) else None
        if not isinstance(served, str) or not served:
            raise AuditError(f"GET {path}: the server sends no public key ({excerpt(orjson.dumps(answer))}); "
                             "give --public-key")
        return public_key_for({"public_key": served}, None)


API_KEY = re.compile(r"[\x21-\x7e]+")
"""What an API key may hold: a header value of visible ASCII (a CR or LF would split the header)."""


def hex_hash(value: object) -> bytes:
    if not isinstance(value, str) or not HEX64.fullmatch(value):
        raise ValueError(f"not 64 lowercase hex digits: {value!r}")
    return bytes.fromhex(value)


def hash_list(values: list[object]) -> list[bytes]:
    if len(values) > 64:
        raise ValueError(f"a path of {len(values)} hashes: no tree is that deep")
    return [hex_hash(value) for value in values]


def excerpt(body: bytes, limit: int = 120) -> str:
    """A short one-line view of what a server sent: an HTML page must not fill the terminal."""
    text = " ".join(body[:limit * 4].decode(errors="replace").split())
    return text if len(text) <= limit else text[:limit] + "…"


def problem_text(body: bytes) -> str:
    try:
        problem = orjson.loads(body)
        return excerpt(f"{problem['code']}: {problem['detail']}".encode())
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return excerpt(body)


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
        if old.timestamp >= new.timestamp:  # the arguments swapped: bad input, nothing checked
            raise AuditError(f"OLD (tree_size {old.tree_size}, signed {old.timestamp}) is newer than NEW "
                             f"(tree_size {new.tree_size}, signed {new.timestamp}): give them in order")
        return False, (f"NEW, signed later, covers {new.tree_size} events, fewer than OLD's {old.tree_size}: "
                       "the log shrank")
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
