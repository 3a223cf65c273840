"""KnownHeads, what a process knows of the log's head and its streams' heads: following the log tail's
pages (with several workers) and its own appends, in whichever order they arrive."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from backend.store.events import RecordedEvent
from backend.store.planner import BatchPlanner, KnownHeads

AT = datetime(2030, 1, 1, tzinfo=UTC)


def event(position: int, stream: str, version: int) -> RecordedEvent:
    return RecordedEvent(position, stream, version, "Thing", {}, {}, uuid.uuid4(), AT, b"h%d" % position)


def committed(stream: str, version: int, head: int) -> BatchPlanner:
    """A planner as a committed batch leaves it: the stream at `version`, the log at `head`."""
    return BatchPlanner({stream: (version, b"h%d" % head)}, head, AT)


def test_a_page_from_the_known_head_moves_the_streams_and_the_head() -> None:
    heads = KnownHeads()
    heads.advance(committed("a", 1, 1), {"a"}, 0)
    assert heads.follow([event(1, "a", 1), event(2, "b", 1), event(3, "a", 2)], 3)
    assert heads.head == 3
    assert heads.knows("a", 2) and heads.knows("b", 1) and not heads.knows("a", 1)


def test_a_page_that_skips_positions_forgets_everything() -> None:
    heads = KnownHeads()
    heads.advance(committed("a", 1, 1), {"a"}, 0)
    assert not heads.follow([event(3, "b", 1)], 3)
    assert heads.head is None and not heads.knows("a", 1)


def test_an_own_append_the_tail_handed_over_first_changes_nothing() -> None:
    heads = KnownHeads()
    heads.advance(committed("a", 1, 1), {"a"}, 0)
    heads.follow([event(2, "a", 2), event(3, "b", 1)], 3)
    heads.advance(committed("a", 2, 2), {"a"}, 1)  # this process's batch at 2 settles after the page
    assert heads.head == 3 and heads.knows("b", 1) and heads.knows("a", 2)


def test_an_append_above_an_unseen_foreign_one_waits_for_the_tail_when_followed() -> None:
    heads = KnownHeads()
    heads.advance(committed("a", 1, 1), {"a"}, 0)
    heads.follow([], 1)
    heads.advance(committed("a", 2, 3), {"a"}, 2)  # someone appended position 2, not yet handed over
    assert heads.head == 1  # not known to be exact at 3: the fence at 1 fails in the database
    heads.follow([event(2, "b", 1), event(3, "a", 2)], 3)
    assert heads.head == 3 and heads.knows("a", 2) and heads.knows("b", 1)


def test_without_the_tail_an_append_above_a_foreign_one_forgets_the_rest() -> None:
    heads = KnownHeads()
    heads.advance(committed("a", 1, 1), {"a"}, 0)
    heads.seen(1, {"c": (4, b"c")})
    heads.advance(committed("a", 2, 3), {"a"}, 2)
    assert heads.head == 3 and heads.knows("a", 2) and not heads.knows("c", 4)


def test_a_read_at_another_head_keeps_only_newer_stream_heads() -> None:
    """Read at another log head, a stream's head is still committed history (the fence checks it in the
    database): a newer version than the one known is kept, an older one (a read that came back late) is
    not, and the log's head stays where this process knows it."""
    heads = KnownHeads()
    heads.advance(committed("a", 2, 2), {"a"}, 0)
    heads.seen(7, {"a": (5, b"a5"), "b": (1, b"b1")})
    assert heads.head == 2 and heads.knows("a", 5) and heads.knows("b", 1)
    heads.seen(3, {"a": (3, b"a3")})
    assert heads.knows("a", 5) and not heads.knows("a", 3)


def test_a_process_that_knows_no_head_learns_nothing_from_a_read() -> None:
    heads = KnownHeads()
    heads.seen(7, {"a": (5, b"a5")})
    assert heads.head is None and not heads.knows("a", 5)
