"""What a wallet remembers of its past forever (closed locks and reservations, credited deposits), in
a map whose copy does not grow with that past.

The repository copies an aggregate for every command it decides on; with plain dicts that copy grew
with every lock and reservation a wallet ever closed (measured; see docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

HEAD_SIZE = 32
"""Entries added since the last freeze, copied with the map."""


class AppendOnlyMap(Mapping[K, V]):
    """A mapping that is only ever added to, and whose copy costs O(log n).

    Entries live in frozen levels (dicts that are never mutated once built, so copies share them)
    and a small head that each copy gets its own of. A full head becomes the newest level, and the
    newest levels merge while the older one is no bigger (a binary counter): O(log n) levels, each
    entry copied O(log n) times over its life, lookups that try the head and then each level.
    Setting a key again shadows the older value (event replay must accept any recorded history);
    iterating and len() then build the merged dict, which only snapshots and tests do."""

    __slots__ = ("_head", "_levels")

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        frozen = dict(items)
        self._levels: tuple[dict[K, V], ...] = (frozen,) if frozen else ()
        self._head: dict[K, V] = {}

    def __setitem__(self, key: K, value: V) -> None:
        self._head[key] = value
        if len(self._head) >= HEAD_SIZE:
            self._freeze_head()

    def copy(self) -> AppendOnlyMap[K, V]:
        copied: AppendOnlyMap[K, V] = object.__new__(AppendOnlyMap)
        copied._levels = self._levels
        copied._head = self._head.copy()
        return copied

    def _freeze_head(self) -> None:
        levels = list(self._levels)
        merged = self._head
        while levels and len(levels[-1]) <= len(merged):
            merged = {**levels.pop(), **merged}  # a new dict: copies may still share the old levels
        self._levels = (*levels, merged)
        self._head = {}

    def __getitem__(self, key: K) -> V:
        if key in self._head:
            return self._head[key]
        for level in reversed(self._levels):
            if key in level:
                return level[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._head or any(key in level for level in self._levels)

    def _merged(self) -> dict[K, V]:
        merged: dict[K, V] = {}
        for level in self._levels:
            merged.update(level)
        merged.update(self._head)
        return merged

    def __iter__(self) -> Iterator[K]:
        return iter(self._merged())

    def __len__(self) -> int:
        return len(self._merged())

    def __bool__(self) -> bool:
        return bool(self._head) or bool(self._levels)

    def __repr__(self) -> str:
        return f"AppendOnlyMap({self._merged()!r})"
