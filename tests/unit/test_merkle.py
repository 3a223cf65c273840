"""RFC 9162 tree hashing and proofs: every size up to 40 against the recursive definition, wrong paths
refused, and a property test over random sizes, indices and alterations."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryTree,
    ProofError,
    consistency_ranges,
    inclusion_ranges,
    leaf_bytes,
    leaf_hash,
    node_hash,
    reference_root,
    subtrees,
    verify_consistency,
    verify_inclusion,
)

SIZES = range(1, 41)


def leaves(count: int) -> list[bytes]:
    return [leaf_hash(p, hashlib.sha256(str(p).encode()).digest()) for p in range(1, count + 1)]


LEAVES = leaves(64)
TREE = MemoryTree(LEAVES)


def flip(value: bytes) -> bytes:
    return bytes([value[0] ^ 1]) + value[1:]


def test_leaf_and_node_hashing_follow_the_rfc() -> None:
    event = bytes(range(32))
    assert leaf_bytes(258, event) == b"\x00\x00\x00\x00\x00\x00\x01\x02" + event
    assert leaf_hash(258, event) == hashlib.sha256(b"\x00" + leaf_bytes(258, event)).digest()
    assert node_hash(b"a" * 32, b"b" * 32) == hashlib.sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()
    assert reference_root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    a, b, c = LEAVES[:3]
    assert reference_root([a, b, c]) == node_hash(node_hash(a, b), c)


@pytest.mark.parametrize("size", [0, *SIZES])
def test_the_frontier_and_its_stored_subtrees_give_the_rfc_root(size: int) -> None:
    frontier = Frontier()
    made: dict[tuple[int, int], bytes] = {}
    for leaf in LEAVES[:size]:
        made.update({(level, index): value for level, index, value in frontier.push(leaf)})
    assert frontier.root() == reference_root(LEAVES[:size])
    for (level, index), value in made.items():
        assert value == TREE.subtree((level, index))
    assert len(made) == 2 * size - bin(size).count("1")  # every complete subtree, nothing more
    reloaded = Frontier(size, [made[node] for node in Frontier.nodes(size)])
    built = Frontier()
    built.extend(LEAVES[:size])
    assert reloaded.root() == built.root() == frontier.root()
    reloaded.push(LEAVES[size])
    assert reloaded.root() == reference_root(LEAVES[:size + 1])


def test_subtrees_of_a_range_are_aligned_and_cover_it() -> None:
    assert subtrees(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert subtrees(8, 13) == [(2, 2), (0, 12)]
    assert subtrees(0, 16) == [(4, 0)]


@pytest.mark.parametrize("size", SIZES)
def test_every_inclusion_proof_verifies_and_no_wrong_one_does(size: int) -> None:
    root = TREE.root(size)
    for index in range(size):
        path = TREE.inclusion(index, size)
        assert verify_inclusion(index, size, LEAVES[index], path, root)
        assert not verify_inclusion(index, size, flip(LEAVES[index]), path, root)
        assert not verify_inclusion(index, size, LEAVES[index], path, flip(root))
        for at in range(len(path)):
            assert not verify_inclusion(index, size, LEAVES[index], [*path[:at], flip(path[at]), *path[at + 1:]],
                                        root)
        if path:
            assert not verify_inclusion(index, size, LEAVES[index], path[:-1], root)
        assert not verify_inclusion(index, size, LEAVES[index], [*path, root], root)
        if size > 1:
            other = (index + 1) % size
            assert not verify_inclusion(other, size, LEAVES[index], path, root) or LEAVES[other] == LEAVES[index]
    assert not verify_inclusion(size, size, LEAVES[0], [], root)


@pytest.mark.parametrize("new", SIZES)
def test_every_consistency_proof_verifies_and_no_wrong_one_does(new: int) -> None:
    new_root = TREE.root(new)
    for old in range(1, new + 1):
        old_root = TREE.root(old)
        path = TREE.consistency(old, new)
        assert verify_consistency(old, new, old_root, new_root, path)
        assert not verify_consistency(old, new, flip(old_root), new_root, path)
        assert not verify_consistency(old, new, old_root, flip(new_root), path)
        for at in range(len(path)):
            assert not verify_consistency(old, new, old_root, new_root, [*path[:at], flip(path[at]), *path[at + 1:]])
        if path:
            assert not verify_consistency(old, new, old_root, new_root, path[:-1])
        assert not verify_consistency(old, new, old_root, new_root, [*path, new_root])
        if old < new:  # the same proof for a different old tree (one leaf changed) fails
            changed = [*LEAVES[:old - 1], flip(LEAVES[old - 1])]
            assert not verify_consistency(old, new, reference_root(changed), new_root, path)


def test_proofs_of_sizes_the_tree_cannot_answer_are_refused() -> None:
    for index, size in ((0, 0), (5, 5), (-1, 3)):
        with pytest.raises(ProofError):
            inclusion_ranges(index, size)
    for old, new in ((0, 3), (4, 3)):
        with pytest.raises(ProofError):
            consistency_ranges(old, new)
        assert not verify_consistency(old, new, EMPTY_ROOT, EMPTY_ROOT, [])


def test_the_rfc_example_shapes() -> None:
    """RFC 9162 2.1.5's 7-leaf tree: the path of d3 is [c, g, l]; the consistency proofs of the trees
    of 3, 4 and 6 leaves are [c, d, g, l], [l] and [i, j, k] (here as the leaf ranges they hash)."""
    assert inclusion_ranges(3, 7) == [(2, 3), (0, 2), (4, 7)]
    assert consistency_ranges(4, 7) == [(4, 7)]
    assert consistency_ranges(3, 7) == [(2, 3), (3, 4), (0, 2), (4, 7)]
    assert consistency_ranges(6, 7) == [(4, 6), (6, 7), (0, 4)]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), new=st.integers(1, 300))
def test_proofs_hold_for_random_trees(data: st.DataObject, new: int) -> None:
    tree = MemoryTree(leaves(new)) if new > 64 else MemoryTree(LEAVES[:new])
    old = data.draw(st.integers(1, new), label="old")
    index = data.draw(st.integers(0, new - 1), label="index")
    new_root, old_root = tree.root(new), tree.root(old)
    path = tree.inclusion(index, new)
    assert verify_inclusion(index, new, tree.leaves[index], path, new_root)
    proof = tree.consistency(old, new)
    assert verify_consistency(old, new, old_root, new_root, proof)
    changed = data.draw(st.integers(0, new - 1), label="changed leaf")
    forged = list(tree.leaves)
    forged[changed] = flip(forged[changed])
    forged_root = reference_root(forged[:new])
    assert not verify_inclusion(index, new, tree.leaves[index], path, forged_root)
    if changed < old:
        assert not verify_consistency(old, new, reference_root(forged[:old]), new_root, proof)
