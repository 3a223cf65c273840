"""Every projection test gets a database of its own: the tests compare read models with the whole log,
and some append malformed events on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.conftest import create_fresh_database, drop_database
from tests.projections.harness import Node


@pytest.fixture
def projection_db(admin_dsn: str) -> Iterator[str]:
    dsn = create_fresh_database(admin_dsn)
    try:
        yield dsn
    finally:
        drop_database(admin_dsn, dsn)


@pytest.fixture
async def node(projection_db: str) -> AsyncIterator[Node]:
    """One process's worth of store, bus and (not yet started) projection runners."""
    opened = await Node.open(projection_db)
    try:
        yield opened
    finally:
        await opened.close()
