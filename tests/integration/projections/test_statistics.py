"""Leading runners refresh their tables' statistics as the tables grow, a logarithmic number of times."""

from __future__ import annotations

import pytest

from projections import balances, runner
from tests.integration.projections.harness import Node
from tests.integration.projections.test_read_models import without_expiry_commands
from tests.integration.projections.workload import Workload
from tests.support import eventually

ANALYZES_SQL = "select relname, analyze_count from pg_stat_user_tables where relname = any($1::text[])"


async def analyze_counts(node: Node, tables: tuple[str, ...]) -> dict[str, int]:
    async with node.pool.acquire() as conn:
        await conn.execute("select pg_stat_clear_snapshot()")
        return {row["relname"]: row["analyze_count"] for row in await conn.fetch(ANALYZES_SQL, list(tables))}


async def test_tables_are_analyzed_at_each_doubling_of_the_events_applied(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "ANALYZE_FIRST_AT", 16)
    tables = balances.Balances.tables
    assert set((await analyze_counts(node, tables)).values()) == {0}
    service = await node.start(without_expiry_commands())
    await Workload(node.bus, seed=3).run(300)
    await eventually(node.caught_up, what="projections to catch up")
    applied = next(r.applied for r in service.runners if r.name == "balances")
    assert applied >= 64

    async def every_table_analyzed() -> bool:
        return min((await analyze_counts(node, tables)).values()) >= 1

    await eventually(every_table_analyzed, what="the balances tables to be analyzed")
    most = applied.bit_length() - 16 .bit_length() + 1  # 16, 32, 64, ... up to `applied`
    assert max((await analyze_counts(node, tables)).values()) <= most
