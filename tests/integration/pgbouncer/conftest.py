"""Every test here runs Tally's pools through a real PgBouncer in transaction mode: DATABASE_URL goes
through it (DATABASE_POOL_MODE=transaction) and DIRECT_DATABASE_URL straight to the test database.
Skipped, saying why, where Debian's pgbouncer is not installed (.ci/run installs it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from backend.config import Settings
from tests.conftest import database_of_its_own, make_settings
from tests.integration.pgbouncer.bouncer import PGBOUNCER, Bouncer, running_pgbouncer


@pytest.fixture(scope="session")
def pgbouncer(admin_dsn: str) -> Iterator[Bouncer]:
    if not os.access(PGBOUNCER, os.X_OK):
        pytest.skip(f"no PgBouncer at {PGBOUNCER} (Debian package 'pgbouncer'; .ci/run installs it)")
    with running_pgbouncer(admin_dsn) as bouncer:
        yield bouncer


@pytest.fixture(scope="package")
def database_url(admin_dsn: str) -> Iterator[str]:
    """A fresh database for this directory: its tests are the suite's own, run again (fixed chain
    transaction ids and all), so they must not meet what the first run left."""
    with database_of_its_own(admin_dsn, migrated=True) as dsn:
        yield dsn


@pytest.fixture
def settings(database_url: str, pgbouncer: Bouncer) -> Settings:
    """The suite's settings with the pools behind PgBouncer; what holds a session connects directly."""
    return make_settings(pgbouncer.dsn_for(database_url), direct_database_url=database_url,
                         database_pool_mode="transaction")
