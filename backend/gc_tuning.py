"""Garbage collector settings for a long-running server process.

Everything imported and built at startup lives as long as the process, yet every full collection
walks it again: measured under `scripts/bench.py http`, each took 40 to 60 ms, twice a second, and no
request moved meanwhile. Frozen after startup, those objects are never scanned (a full collection
then takes about 6 ms), and a larger first-generation threshold makes collections rarer.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Allocations between first-generation collections (CPython's default is 700)."""


def tune_for_serving() -> None:
    """Call once, when startup is over: whatever exists then is treated as permanent."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
