"""The projection_checkpoints table: how far each projection got, and its last failure.

A batch's transaction first locks its projection's row and checks that the checkpoint is still the
one the runner read (the fence): a rebuild that swapped in new tables has moved it, and then the
runner reloads instead of applying its batch on top. Advancing clears any recorded failure.

The runner's common steps take one round trip each for their checkpoint: a step with nothing to apply
(the new events are all of types the projection ignores, as most are for most projections) needs no
transaction, just one conditional UPDATE that fences and advances at once; a step with a batch sends
BEGIN and that same UPDATE as one simple query, and the row stays locked until the batch commits.
Either took up to four round trips (BEGIN, the fence, the advance, COMMIT).
"""

from __future__ import annotations

import contextlib

from backend.db import Connection

ENSURE_SQL = "insert into projection_checkpoints (name) values ($1) on conflict (name) do nothing"
LOAD_SQL = "select position from projection_checkpoints where name = $1"
FENCE_SQL = "select position from projection_checkpoints where name = $1 for update"
_ADVANCE = """
update projection_checkpoints
set position = {position}, updated_at = now(), error = null, failed_position = null, failed_at = null, failures = 0
where name = {name}"""
ADVANCE_SQL = _ADVANCE.format(position="$2", name="$1")
ADVANCE_FROM_SQL = ADVANCE_SQL + " and position = $3 returning 1"
FAIL_SQL = """
update projection_checkpoints
set error = $2, failed_position = $3, failed_at = now(), failures = failures + 1
where name = $1
"""


class Fenced(Exception):
    """The checkpoint is no longer where this runner left it (a rebuild replaced the tables)."""


async def load(conn: Connection, name: str) -> int:
    """The checkpoint, creating the row at 0 the first time."""
    await conn.execute(ENSURE_SQL, name)
    return int(await conn.fetchval(LOAD_SQL, name))


async def advance(conn: Connection, name: str, position: int) -> None:
    await conn.execute(ADVANCE_SQL, name, position)


async def advance_from(conn: Connection, name: str, expected: int, position: int) -> None:
    """Fence and advance in one statement (no transaction needed): moves the checkpoint from expected
    to position, or raises Fenced, changing nothing, when it is no longer at expected."""
    if await conn.fetchval(ADVANCE_FROM_SQL, name, position, expected) is None:
        raise await _fenced(conn, name, expected)


async def begin_batch(conn: Connection, name: str, expected: int, position: int) -> None:
    """Open a batch's transaction with the checkpoint fenced and already advanced to position (the batch
    commits both or neither), in one round trip; or roll back and raise Fenced, when the checkpoint is
    no longer at expected. A simple query takes no parameters, hence the literals."""
    await rollback(conn)  # never open a batch inside what a failed one may have left (no round trip if clean)
    update = _ADVANCE.format(position=int(position), name=_literal(name)) + f" and position = {int(expected)}"
    if await conn.execute(f"begin; {update}") != "UPDATE 1":
        await rollback(conn)
        raise await _fenced(conn, name, expected)


async def rollback(conn: Connection) -> None:
    """End a failed batch's transaction, if the connection still can (a lost one has ended it anyway)."""
    if conn.is_in_transaction():
        with contextlib.suppress(Exception):
            await conn.execute("rollback")


async def _fenced(conn: Connection, name: str, expected: int) -> Fenced:
    return Fenced(f"{name}: checkpoint is {await conn.fetchval(LOAD_SQL, name)}, expected {expected}")


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on: only quotes need doubling)."""
    return "'" + text.replace("'", "''") + "'"


async def record_failure(conn: Connection, name: str, position: int | None, error: str) -> None:
    await conn.execute(FAIL_SQL, name, error[:2000], position)


def with_checkpoint(name: str, query: str) -> str:
    """SQL: the rows of `query` (a lateral subquery, so it may use the outer statement's parameters), each
    beside the projection's checkpoint, read in one statement and so one snapshot: the rows are as of
    that checkpoint. No row matching gives one row of nulls but the checkpoint."""
    return f"""
select c.position as checkpoint, q.* from projection_checkpoints c
left join lateral ({query}) q on true
where c.name = '{name}'
"""
