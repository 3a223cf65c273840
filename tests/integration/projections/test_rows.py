"""Rows: a batch of rows as one jsonb parameter reaches SQL with the declared types, values intact."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.base import Rows, id_array

ROWS = Rows(id="uuid", amount="bigint", note="text", at="timestamptz", count="int")
SELECT_SQL = f"select * from {ROWS.source('$1')} as x"

texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=40)
rows = st.tuples(
    st.uuids(),
    st.integers(-(2**63), 2**63 - 1),
    st.none() | texts,
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)),
    st.none() | st.integers(-(2**31), 2**31 - 1),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(rows, max_size=20))
async def test_rows_arrive_with_their_types_and_values(pool: asyncpg.Pool, batch: list[tuple[object, ...]]) -> None:
    fetched = await pool.fetch(SELECT_SQL, ROWS.of(batch))
    assert [tuple(record) for record in fetched] == batch


async def test_id_array_selects_by_ids(pool: asyncpg.Pool) -> None:
    ids = [uuid.uuid4() for _ in range(3)]
    found = await pool.fetchval(f"select array_agg(id order by id) from unnest($2::uuid[]) as id "
                                f"where id = any({id_array('$1')})", [str(ids[0]), str(ids[2])], ids)
    assert found == sorted([ids[0], ids[2]])


def test_a_row_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError, match="a row of 2 values where 5 columns are declared"):
        ROWS.of([(uuid.uuid4(), 1)])
