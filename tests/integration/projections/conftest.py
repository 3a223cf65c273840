"""Every projection test gets a database of its own: the tests compare read models with the whole log,
and some append malformed events on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.projections.harness import Node


@pytest.fixture
async def node(own_database_url: str) -> AsyncIterator[Node]:
    """One process's worth of store, bus and (not yet started) projection runners."""
    opened = await Node.open(own_database_url)
    try:
        yield opened
    finally:
        await opened.close()
