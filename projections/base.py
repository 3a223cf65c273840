"""What a projection is: a name, the event types it handles, the tables it owns and a batch `apply`.

`apply(conn, events)` (events.Event, payloads already at their current schema version) runs inside the
runner's transaction, which also advances the checkpoint, so it must only write its own tables and
must not commit. It gets a whole batch and should turn it into a few set-based statements (each
batch of rows one jsonb parameter, see `Rows`), never one round trip per event: that is what makes a
rebuild fast. It raises on an event it cannot make sense of; the runner then finds the exact event,
records it and retries later (see runner.py).

Process managers (expiry.py) also implement `tick`, which the runner calls whenever it has caught
up with the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from backend.db import Connection
from projections.events import Event


class MalformedEvent(ValueError):
    """An event of a handled type whose payload does not have the shape its type promises."""


class Projection:
    name: ClassVar[str]
    types: ClassVar[frozenset[str] | None]
    """The event types apply() receives; None means every event, whatever its type."""
    tables: ClassVar[tuple[str, ...]]
    """Tables this projection alone writes; a rebuild replaces exactly these."""

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        raise NotImplementedError

    async def tick(self, conn: Connection) -> float | None:
        """Called when caught up; returns seconds until it wants to run again (None: no wish)."""
        return None

    def resume(self) -> None:
        """The runner (re)loaded its checkpoint and follows the log from there: forget anything learned
        from earlier batches (a rebuild or another process may have applied events in between)."""

    def handles(self, event_type: str) -> bool:
        return self.types is None or event_type in self.types


# ---------------------------------------------------------------- helpers for apply()


class Rows:
    """A batch of rows passed as one jsonb parameter: a JSON array of row arrays, which `source`
    unpacks in SQL by position and casts to the declared types (JSON null is SQL NULL).

    Not one array per column through `unnest`: asyncpg checks every element of an array parameter
    against collections.abc ABCs, in Python, which costs more than the statement (measured; see
    docs/PERFORMANCE.md); the jsonb document is written by orjson, in C (backend/db.py's codec)."""

    def __init__(self, **columns: str) -> None:
        self.columns = tuple(columns.items())
        """(name, SQL type) in row order."""

    def source(self, param: str) -> str:
        """A FROM item (alias it) whose columns are the declared ones, read from jsonb parameter `param`."""
        fields = ", ".join(f"(r->>{i})::{sql_type} as {name}" for i, (name, sql_type) in enumerate(self.columns))
        return f"(select {fields} from jsonb_array_elements({param}::jsonb) as r)"

    def of(self, rows: Iterable[Sequence[Any]]) -> list[Sequence[Any]]:
        """The parameter for rows, each as wide as the declaration (a short row would read as NULLs)."""
        batch = list(rows)
        width = len(self.columns)
        for row in batch:
            if len(row) != width:
                raise ValueError(f"a row of {len(row)} values where {width} columns are declared")
        return batch


def id_array(param: str, sql_type: str = "uuid") -> str:
    """SQL for the array of ids in jsonb parameter `param` (a JSON array), e.g. for `= any(...)`."""
    return f"array(select jsonb_array_elements_text({param}::jsonb)::{sql_type})"


def expect_count(status: str, expected: int, problem: str) -> None:
    """`UPDATE n` / `DELETE n` must touch every row the batch names, or the log is inconsistent."""
    count = int(status.rsplit(" ", 1)[-1])
    if count != expected:
        raise MalformedEvent(f"{problem} ({count} of {expected} rows matched)")



def aggregate_id(event: Event, prefix: str) -> str:
    """The id part of `<category>-<uuid>` (PostgreSQL's uuid cast validates it)."""
    stream_id = event.stream_id
    if not stream_id.startswith(prefix):
        raise MalformedEvent(f"{event.type} at position {event.position} is on stream {stream_id!r}")
    return stream_id[len(prefix):]


def integer(data: dict[str, Any], key: str) -> int:
    """Money and counts must be real integers (a bool or a string would add up wrongly or late)."""
    value = data[key]
    if type(value) is not int:
        raise MalformedEvent(f"{key} must be an integer, got {type(value).__name__}")
    return value


WALLET = "wallet-"
DEPOSIT = "deposit-"
APIKEY = "apikey-"
