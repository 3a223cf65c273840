"""The command line with DATABASE_URL through PgBouncer in transaction mode and DIRECT_DATABASE_URL
direct, as real processes: migrating (a session lock across transactions), creating a key, rebuilding
the projections (a session lock per projection) and verifying the log all work."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.integration.pgbouncer.bouncer import Bouncer


def tally(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    merged = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL")} | env
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=merged, text=True,
                          capture_output=True, timeout=120)


def test_migrate_keys_rebuild_and_verify_through_pgbouncer(pgbouncer: Bouncer, fresh_database_url: str) -> None:
    env = {"DATABASE_URL": pgbouncer.dsn_for(fresh_database_url), "DIRECT_DATABASE_URL": fresh_database_url,
           "DATABASE_POOL_MODE": "transaction", "LOG_FORMAT": "text"}
    migrated = tally("migrate", env=env)
    assert migrated.returncode == 0 and "applied" in migrated.stdout, migrated.stderr
    status = tally("migrate", "--status", env=env)
    assert status.returncode == 0 and " 0 pending" in status.stdout, status.stdout + status.stderr
    key = tally("keys", "create", "--owner", "ops", "--scopes", "admin", "--token-only", env=env)
    assert key.returncode == 0 and key.stdout.startswith("tly_"), key.stderr
    rebuilt = tally("projections", "rebuild", "--all", env=env)
    assert rebuilt.returncode == 0, rebuilt.stderr
    verified = tally("audit", "verify", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
