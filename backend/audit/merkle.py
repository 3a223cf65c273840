"""The RFC 9162 (Certificate Transparency v2) Merkle tree over the global log, and its proofs.

Leaf i (0-based) is the event at position i + 1. Its bytes are
``leaf = position as 8 bytes big-endian || the event's 32-byte stored hash`` (the per-stream chain
hash), so the tree commits to every position and, through the chain, to every event's content.

    leaf hash  = SHA-256(0x00 || leaf)
    node hash  = SHA-256(0x01 || left || right)
    MTH({})    = SHA-256()
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two < n

A *complete subtree* (level L, index i) covers the aligned leaves [i * 2^L, (i + 1) * 2^L); every
range a proof needs is a short run of such subtrees (`subtrees`), so a stored table of them answers
any proof in one read of O(log n) rows. Proof paths and their checks follow RFC 9162 sections 2.1.3
and 2.1.4 exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeAlias

EMPTY_ROOT = hashlib.sha256(b"").digest()
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"

Node: TypeAlias = tuple[int, int]
"""(level, index): the complete subtree over leaves [index << level, (index + 1) << level)."""
Range: TypeAlias = tuple[int, int]
"""Leaves [start, end)."""


class ProofError(ValueError):
    """A proof was asked for sizes or an index the tree cannot answer (bad input, not a failed check)."""


def leaf_bytes(position: int, event_hash: bytes) -> bytes:
    return position.to_bytes(8, "big") + event_hash


def leaf_hash(position: int, event_hash: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + position.to_bytes(8, "big") + event_hash).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def reference_root(leaves: Sequence[bytes]) -> bytes:
    """MTH of leaf hashes by the RFC's recursive definition (slow; the specification, for tests)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = split(len(leaves))
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


class Frontier:
    """The right edge of a growing tree: one complete subtree per set bit of its size, largest first.

    `push` adds a leaf hash and returns the subtrees that became complete (the leaf itself first),
    which is what the folder stores; `root` folds the edge into MTH of the leaves so far."""

    __slots__ = ("hashes", "levels", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        self.size = size
        self.levels = [level for level in range(size.bit_length() - 1, -1, -1) if size >> level & 1]
        if len(hashes) != len(self.levels):
            raise ValueError(f"a tree of size {size} has {len(self.levels)} edge subtrees, not {len(hashes)}")
        self.hashes = list(hashes)

    def push(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        index = self.size
        made = [(0, index, leaf)]
        levels, hashes = self.levels, self.hashes
        level, value = 0, leaf
        while levels and levels[-1] == level:
            levels.pop()
            value = hashlib.sha256(NODE_PREFIX + hashes.pop() + value).digest()
            level += 1
            made.append((level, index >> level, value))
        levels.append(level)
        hashes.append(value)
        self.size = index + 1
        return made

    def extend(self, leaves: Iterable[bytes]) -> None:
        """push without keeping what it made (building a tree only for its root)."""
        levels, hashes, sha256, prefix = self.levels, self.hashes, hashlib.sha256, NODE_PREFIX
        size = self.size
        for leaf in leaves:
            level, value = 0, leaf
            while levels and levels[-1] == level:
                levels.pop()
                value = sha256(prefix + hashes.pop() + value).digest()
                level += 1
            levels.append(level)
            hashes.append(value)
            size += 1
        self.size = size

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        value = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            value = node_hash(left, value)
        return value

    @staticmethod
    def nodes(size: int) -> list[Node]:
        """The edge subtrees of a tree of `size` leaves, largest first (what a Frontier is loaded from)."""
        found, start = [], 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                found.append((level, start >> level))
                start += 1 << level
        return found


def subtrees(start: int, end: int) -> list[Node]:
    """[start, end) as complete subtrees left to right, each the largest that fits where it starts.
    For the ranges of RFC 9162's recursion (start aligned to a power of two >= end - start) this is
    exactly MTH's own split, so `range_hash` of them is MTH(D[start:end])."""
    found = []
    while start < end:
        level = (end - start).bit_length() - 1  # the largest that fits...
        if start:
            aligned = (start & -start).bit_length() - 1  # ...and is aligned where it starts
            level = min(level, aligned)
        found.append((level, start >> level))
        start += 1 << level
    return found


def range_hash(nodes: Sequence[Node], hashes: Mapping[Node, bytes]) -> bytes:
    value = hashes[nodes[-1]]
    for node in reversed(nodes[:-1]):
        value = node_hash(hashes[node], value)
    return value


def inclusion_ranges(index: int, size: int) -> list[Range]:
    """RFC 9162 2.1.3.1 PATH(m, D[n]): the ranges whose MTH make the audit path, leaf side first."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    path: list[Range] = []
    start, end = 0, size
    while end - start > 1:
        k = split(end - start)
        if index < start + k:
            path.append((start + k, end))
            end = start + k
        else:
            path.append((start, start + k))
            start += k
    path.reverse()
    return path


def consistency_ranges(old: int, new: int) -> list[Range]:
    """RFC 9162 2.1.4.1 PROOF(m, D[n]) = SUBPROOF(m, D[n], true), as ranges, in proof order."""
    if not 0 < old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    path: list[Range] = []
    start, end, m, whole = 0, new, old, True
    tail: list[Range] = []
    while True:
        n = end - start
        if m == n:
            if not whole:
                path.append((start, end))
            break
        k = split(n)
        if m <= k:
            tail.append((start + k, end))
            end = start + k
        else:
            tail.append((start, start + k))
            start, m, whole = start + k, m - k, False
    return path + tail[::-1]


def plan(ranges: Iterable[Range]) -> list[list[Node]]:
    """Each range as its subtrees (`subtrees`), computed once for both the read and the assembly."""
    return [subtrees(start, end) for start, end in ranges]


def needed(parts: Iterable[Sequence[Node]]) -> list[Node]:
    """Every stored subtree the planned ranges are made of (what one read must fetch), each once."""
    found: dict[Node, None] = {}
    for nodes in parts:
        found.update(dict.fromkeys(nodes))
    return list(found)


def assemble(parts: Iterable[Sequence[Node]], hashes: Mapping[Node, bytes]) -> list[bytes]:
    return [hashes[nodes[0]] if len(nodes) == 1 else range_hash(nodes, hashes) for nodes in parts]


def _up_the_right_edge(fn: int, sn: int) -> tuple[int, int]:
    """RFC 9162's step shared by both verifications: right-shift fn and sn together until fn's lowest
    bit is set or fn is 0."""
    while True:
        fn >>= 1
        sn >>= 1
        if fn & 1 or fn == 0:
            return fn, sn


def verify_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 2.1.3.2: does `path` prove leaf hash `leaf` at `index` in the tree of `size` with `root`?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                fn, sn = _up_the_right_edge(fn, sn)
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, path: Sequence[bytes]) -> bool:
    """RFC 9162 2.1.4.2: does `path` prove the tree of size `new` extends the tree of size `old`?"""
    if not 0 < old <= new:
        return False
    if old == new:
        return not path and old_root == new_root
    proof = list(path)
    if old & (old - 1) == 0:  # a power of two: the old root is the proof's implicit first node
        proof.insert(0, old_root)
    if not proof:
        return False
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                fn, sn = _up_the_right_edge(fn, sn)
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


class MemoryTree:
    """Every leaf hash in memory, subtrees computed on demand: proofs over an export, and the tests'
    reference for the stored tree."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        self.leaves = list(leaves)

    def subtree(self, node: Node) -> bytes:
        level, index = node
        return self.range_root(index << level, (index + 1) << level)

    def range_root(self, start: int, end: int) -> bytes:
        return reference_root(self.leaves[start:end])

    def hashes(self, nodes: Iterable[Node]) -> dict[Node, bytes]:
        return {node: self.subtree(node) for node in nodes}

    def root(self, size: int | None = None) -> bytes:
        return reference_root(self.leaves[:size])

    def inclusion(self, index: int, size: int) -> list[bytes]:
        parts = plan(inclusion_ranges(index, size))
        return assemble(parts, self.hashes(needed(parts)))

    def consistency(self, old: int, new: int) -> list[bytes]:
        parts = plan(consistency_ranges(old, new))
        return assemble(parts, self.hashes(needed(parts)))

