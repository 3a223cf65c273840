"""Garbage collector settings for a long-running server process.

Everything imported and built at startup lives as long as the process, yet every full collection
walks it again, and no request moves meanwhile. Frozen after startup, those objects are never scanned
(measured much shorter pauses; see docs/PERFORMANCE.md), and a larger first-generation threshold makes
collections rarer.
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
