"""Which events a subscriber receives: the client's filters plus the owner its key is limited to.

``matches`` decides for events in the shared window; ``query`` narrows the store read of a subscriber
that is behind the window (``matches`` still has the last word on what the query returns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from backend.domain.registry import LOGGED_TYPES
from backend.store.events import MAX_STREAM_ID_LENGTH, MAX_TYPE_LENGTH
from backend.store.reads import COLUMNS
from backend.streaming.owners import WALLET_PREFIX
from backend.streaming.window import Item

MAX_TYPES = 64


class InvalidFilter(ValueError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field


class UnknownTypes(InvalidFilter):
    """``types`` names event types the log never holds (backend.domain.registry.LOGGED_TYPES)."""

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__("types", "unknown event types " + ", ".join(sorted(names)))
        self.names = names


@dataclass(frozen=True, slots=True)
class EventFilter:
    stream: str | None = None
    stream_prefix: str | None = None
    types: frozenset[str] | None = None
    owner: str | None = None
    """Only events of the wallets this owner holds (a key without ``audit:read``)."""

    @property
    def everything(self) -> bool:
        return self.stream is None and self.stream_prefix is None and self.types is None and self.owner is None

    def matches(self, item: Item) -> bool:
        _, stream_id, type_, owner, _ = item
        return self.accepts(stream_id, type_, owner)

    def accepts(self, stream_id: str, type_: str, owner: str | None) -> bool:
        if self.stream is not None and stream_id != self.stream:
            return False
        if self.stream_prefix is not None and not stream_id.startswith(self.stream_prefix):
            return False
        if self.types is not None and type_ not in self.types:
            return False
        return self.owner is None or owner == self.owner

    def query(self, after: int, limit: int) -> tuple[str, list[object]]:
        """SQL for the next page of possibly matching events after a position, in position order."""
        args: list[object] = [after, limit]
        where = ["position > $1"]
        if self.types is not None:
            args.append(sorted(self.types))
            where.append(f"type = any(${len(args)}::text[])")
        if self.stream is not None:
            args.append(self.stream)
            where.append(f"stream_id = ${len(args)}")
        else:
            prefix = self.stream_prefix
            if self.owner is not None and (prefix is None or WALLET_PREFIX.startswith(prefix)):
                prefix = WALLET_PREFIX
            if prefix is not None:
                args.append(prefix)
                where.append(f"starts_with(stream_id, ${len(args)})")
        sql = f"select {COLUMNS} from events where {' and '.join(where)} order by position limit $2"
        return sql, args


EVERYTHING = EventFilter()


def parse_filter(query: Mapping[str, str]) -> EventFilter:
    """``stream``, ``stream_prefix`` and ``types`` (a comma list) from a query string."""
    if not {"stream", "stream_prefix", "types"} & query.keys():
        return EVERYTHING  # the common case shares one (immutable) instance: thousands of streams hold it
    stream = _text(query, "stream", MAX_STREAM_ID_LENGTH)
    prefix = _text(query, "stream_prefix", MAX_STREAM_ID_LENGTH)
    types: frozenset[str] | None = None
    if "types" in query:
        names = [name.strip() for name in query["types"].split(",") if name.strip()]
        if not names:
            raise InvalidFilter("types", "must name at least one event type")
        if len(names) > MAX_TYPES or any(len(name) > MAX_TYPE_LENGTH for name in names):
            raise InvalidFilter("types", f"at most {MAX_TYPES} types of at most {MAX_TYPE_LENGTH} characters")
        types = frozenset(names)
        if unknown := types - LOGGED_TYPES:
            raise UnknownTypes(unknown)
    return EventFilter(stream=stream, stream_prefix=prefix, types=types)


def _text(query: Mapping[str, str], name: str, max_length: int) -> str | None:
    if name not in query:
        return None
    value = query[name]
    if not value or len(value) > max_length:
        raise InvalidFilter(name, f"must be 1 to {max_length} characters")
    return value
