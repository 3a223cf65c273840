"""`audit diff-projections`: rebuild every read model from the log into scratch tables and compare
them row by row with the live ones.

Scratch copies live in schemas of the run's own, `tally_audit_<run>_<projection>` (`like ... including
all`), and are written by each projection's own, unchanged `apply` through the search_path, as
projections/rebuild.py does. The log is replayed up to each projection's live checkpoint; then one
transaction per projection locks its checkpoint row (the live runner's next batch waits), applies
whatever the runner added meanwhile, and compares: both sides reflect exactly the same position. Rows
are compared as whole records (EXCEPT ALL, both ways) and paired by primary key to tell a changed row
from a missing or an extra one. Nothing live is written.

Every run has its own schemas, so diffs may run at once; its session holds the run's lock (DIFF_LOCK)
from before it makes any schema until they are dropped. A run that fails drops them on a fresh session,
since its own may be the one that was lost; one that dies leaves them, and the next diff drops every
such schema whose lock is free (projections/scratch_schemas.py).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from backend.db import Connection
from projections import leader
from projections.events import Event, read_batch
from projections.leader import Connect
from projections.scratch_schemas import ScratchSchemas

if TYPE_CHECKING:
    from projections.base import Projection

SCRATCH_PREFIX = "tally_audit_"
DIFF_LOCK = 0x7A11_0008
"""Advisory lock namespace of "diff run <run>" (0x7A11_0001 and _0002 are the store's, _0005 and _0006 the
projections', _0007 the Merkle folder's)."""
SCHEMAS = ScratchSchemas(SCRATCH_PREFIX, DIFF_LOCK, re.compile(r"(?P<owner>[0-9a-f]{12})_[a-z_][a-z0-9_]{0,40}"),
                         "diff")
"""`tally_audit_<run>_<projection>`, all of one run held by that run's lock."""
SAMPLE = 20
"""Differing rows shown per table (all are counted)."""
BATCH = 5000
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")

CHECKPOINT_SQL = "select position from projection_checkpoints where name = $1"
FENCE_SQL = "select position from projection_checkpoints where name = $1 for update"
PRIMARY_KEY_SQL = """
select a.attname from pg_index i
join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
where i.indrelid = $1::regclass and i.indisprimary
order by array_position(i.indkey::int2[], a.attnum)
"""
ONLY_IN_SQL = "select to_jsonb(d) from (select * from {a} except all select * from {b}) d limit {limit}"
COUNT_ONLY_IN_SQL = "select count(*) from (select * from {a} except all select * from {b}) d"


@dataclass(frozen=True, slots=True)
class RowDifference:
    kind: str
    """"changed" (same key, other values), "missing" (only in the rebuild), "extra" (only live)."""
    key: dict[str, Any]
    live: dict[str, Any] | None
    rebuilt: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "live": self.live, "rebuilt": self.rebuilt}


@dataclass(slots=True)
class TableDiff:
    projection: str
    table: str
    position: int
    only_live: int = 0
    only_rebuilt: int = 0
    rows: list[RowDifference] = field(default_factory=list)

    @property
    def count(self) -> int:
        return max(self.only_live, self.only_rebuilt)

    def describe(self) -> str:
        lines = [f"{self.projection}.{self.table} at position {self.position}: {self.only_live} live row(s) not "
                 f"rebuilt, {self.only_rebuilt} rebuilt row(s) not live"]
        for row in self.rows:
            lines.append(f"  {row.kind} {_json(row.key)}: live {_json(row.live)} rebuilt {_json(row.rebuilt)}")
        return "\n".join(lines)


@dataclass(slots=True)
class DiffReport:
    tables: list[TableDiff] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    """Projection name -> why its rebuild failed (itself a finding: the log does not replay)."""

    @property
    def differences(self) -> list[TableDiff]:
        return [t for t in self.tables if t.count]

    @property
    def ok(self) -> bool:
        return not self.differences and not self.errors


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _check_identifier(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


class _Scratch:
    """One projection's scratch tables and how far they have replayed the log."""

    def __init__(self, projection: Projection, run: str, home: str, live_position: int) -> None:
        self.projection = projection
        self.name = _check_identifier(projection.name)
        self.schema = SCHEMAS.schema(run, self.name)
        self.home = home
        self.target = live_position
        self.position = 0
        self.error: str | None = None

    async def create(self, conn: Connection) -> None:
        await conn.execute(f"create schema {self.schema}")
        for table in self.projection.tables:
            name = _check_identifier(table)
            await conn.execute(f"create table {self.schema}.{name} (like {self.home}.{name} including all)")

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        """Apply the events it handles, up to its target, in a transaction writing the scratch tables."""
        mine = [e for e in events if e.position <= self.target and self.projection.handles(e.type)]
        if mine and self.error is None:
            try:
                async with conn.transaction():
                    await conn.execute(f"set local search_path = {self.schema}, {self.home}")
                    await self.projection.apply(conn, mine)
            except Exception as exc:
                self.error = f"cannot replay up to position {mine[-1].position}: {type(exc).__name__}: {exc}"
        if events:
            self.position = min(self.target, events[-1].position)

    async def compare(self, conn: Connection) -> list[TableDiff]:
        """Catch up with the live checkpoint while holding it, then compare every table."""
        async with conn.transaction():
            locked = await conn.fetchval(FENCE_SQL, self.name)
            self.target = int(locked or 0)
            types = sorted(self.projection.types) if self.projection.types is not None else None
            while self.position < self.target and self.error is None:
                tail = await read_batch(conn, self.position, BATCH, types)
                if not tail:
                    break
                await self.apply(conn, tail)
            if self.error is not None:
                return []
            return [await self._compare_table(conn, _check_identifier(t)) for t in self.projection.tables]

    async def _compare_table(self, conn: Connection, table: str) -> TableDiff:
        live, rebuilt = f"{self.home}.{table}", f"{self.schema}.{table}"
        diff = TableDiff(self.name, table, self.target)
        diff.only_live = int(await conn.fetchval(COUNT_ONLY_IN_SQL.format(a=live, b=rebuilt)))
        diff.only_rebuilt = int(await conn.fetchval(COUNT_ONLY_IN_SQL.format(a=rebuilt, b=live)))
        if diff.only_live or diff.only_rebuilt:
            keys = [r[0] for r in await conn.fetch(PRIMARY_KEY_SQL, live)]
            live_rows = [r[0] for r in await conn.fetch(ONLY_IN_SQL.format(a=live, b=rebuilt, limit=SAMPLE))]
            rebuilt_rows = [r[0] for r in await conn.fetch(ONLY_IN_SQL.format(a=rebuilt, b=live, limit=SAMPLE))]
            diff.rows = pair_rows(keys, live_rows, rebuilt_rows)
        return diff

    async def drop(self, conn: Connection) -> None:
        await conn.execute(f"drop schema if exists {self.schema} cascade")


def pair_rows(keys: Sequence[str], live: Sequence[dict[str, Any]], rebuilt: Sequence[dict[str, Any]]
              ) -> list[RowDifference]:
    """Rows on both sides with the same primary key changed; the others are extra or missing."""
    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(k) for k in keys) if keys else tuple(sorted(row.items(), key=str))

    by_key = {key_of(row): row for row in rebuilt}
    paired: list[RowDifference] = []
    for row in live:
        key = key_of(row)
        match = by_key.pop(key, None) if keys else None
        shown = {k: row.get(k) for k in keys}
        paired.append(RowDifference("changed" if match is not None else "extra", shown, row, match))
    paired.extend(RowDifference("missing", {k: row.get(k) for k in keys}, None, row) for row in by_key.values())
    return paired


Progress = Callable[[str], None]


async def diff_all(connect: Connect, *, progress: Progress | None = None) -> DiffReport:
    """Rebuild every projection into scratch tables of a run of its own and compare them with the live
    tables, on a session of its own; see the module docstring."""
    say = progress or (lambda _text: None)
    conn = await connect("tally-diff")
    scratches: list[_Scratch] = []
    try:
        run = await _start_run(conn)
        await SCHEMAS.drop_leftovers(conn)  # of any diff that died; ours is locked
        scratches = await _scratches(conn, run)
        report = await _diff(conn, run, scratches, say)
        for scratch in scratches:
            await scratch.drop(conn)
        await conn.close()  # and with the session, the run's lock
    except BaseException:
        conn.terminate()  # the session may be lost or mid-operation: drop the copies on a fresh one
        await SCHEMAS.drop_after_failure(connect, [scratch.schema for scratch in scratches])
        raise
    return report


async def _start_run(conn: Connection) -> str:
    """A new run's id, its lock held by this session (a live run's id may share its lock's hash)."""
    for _ in range(8):
        run = secrets.token_hex(6)
        if await leader.try_lock(conn, DIFF_LOCK, run):
            return run
    raise RuntimeError("no free diff lock after 8 tries")


async def _scratches(conn: Connection, run: str) -> list[_Scratch]:
    from projections.registry import all_projections

    home = _check_identifier(str(await conn.fetchval("select current_schema()")))
    return [_Scratch(p, run, home, int(await conn.fetchval(CHECKPOINT_SQL, p.name) or 0)) for p in all_projections()]


async def _diff(conn: Connection, run: str, scratches: Sequence[_Scratch], say: Progress) -> DiffReport:
    report = DiffReport()
    for scratch in scratches:
        await scratch.create(conn)
    target = max((s.target for s in scratches), default=0)
    position = 0
    say(f"replaying positions 1..{target} into scratch tables (schemas {SCRATCH_PREFIX}{run}_*)")
    while position < target:
        events = await read_batch(conn, position, BATCH)
        if not events:
            break
        for scratch in scratches:
            await scratch.apply(conn, events)
        position = events[-1].position
    for scratch in scratches:
        say(f"comparing {scratch.name}")
        report.tables.extend(await scratch.compare(conn))
        if scratch.error is not None:
            report.errors[scratch.name] = scratch.error
    return report
