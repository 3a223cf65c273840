"""`python -m backend keys`: a real process bootstraps an admin key an app on the same database
accepts, and revokes keys that app then rejects within a second."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid

import asyncpg
import pytest

from backend.appkeys import REPOSITORY
from tests.conftest import ROOT, bearer, mint_token
from tests.support import Client, eventually

pytestmark = pytest.mark.system

TOKEN_LINE = re.compile(r"^token: (tly_[0-9a-f]{32}_\S+)$", re.MULTILINE)
KEY_ID_LINE = re.compile(r"^key_id: ([0-9a-f-]{36})$", re.MULTILINE)


async def keys_cli(database_url: str, *args: str | bytes) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_FORMAT": "text"}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "backend", "keys", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


async def create_with_cli(database_url: str, owner: str, scopes: str) -> tuple[str, str]:
    result = await keys_cli(database_url, "create", "--owner", owner, "--scopes", scopes, "--name", "bootstrap")
    assert result.returncode == 0, result.stderr
    token, key_id = TOKEN_LINE.search(result.stdout), KEY_ID_LINE.search(result.stdout)
    assert token and key_id, result.stdout
    assert result.stdout.count(token[1]) == 1 and token[1] not in result.stderr  # printed once
    assert token[1].startswith(f"tly_{uuid.UUID(key_id[1]).hex}_")
    return key_id[1], token[1]


async def test_cli_bootstraps_a_working_admin_key(client: Client, database_url: str) -> None:
    owner = f"ops-{uuid.uuid4().hex[:8]}"
    key_id, token = await create_with_cli(database_url, owner, "admin")
    made = await client.post("/v1/api-keys", headers=bearer(token),
                             json={"owner": "alice", "name": "svc", "scopes": ["wallets:read"]})
    assert made.status == 201, await made.text()
    after = (await made.json())["position"]  # listings come from the read model: wait for it to see both keys
    listed = await client.get(f"/v1/api-keys?owner={owner}&min_position={after}", headers=bearer(token))
    keys = (await listed.json())["data"]
    assert [(k["key_id"], k["name"], k["scopes"], k["revoked"]) for k in keys] == [
        (key_id, "bootstrap", ["admin"], False)]


async def test_cli_revocation_reaches_a_running_app_within_a_second(client: Client, database_url: str) -> None:
    key_id, token = await create_with_cli(database_url, f"svc-{uuid.uuid4().hex[:8]}", "wallets:read,wallets:write")
    probe = await client.get("/v1/api-keys", headers=bearer(token))
    assert probe.status == 403  # accepted (and cached) by the app, just not an admin

    result = await keys_cli(database_url, "revoke", key_id)
    revoked_at = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert key_id in result.stdout
    async def refused() -> bool:
        return (await client.get("/v1/api-keys", headers=bearer(token))).status == 401

    await eventually(refused, timeout=5 - (time.monotonic() - revoked_at), interval=0.01,
                     what="the revoked key to stop working")
    assert time.monotonic() - revoked_at < 1.0

    again = await keys_cli(database_url, "revoke", key_id)
    assert again.returncode == 2 and "already revoked" in again.stderr


async def test_cli_rejects_bad_input(client: Client, database_url: str) -> None:
    owner = f"x-{uuid.uuid4().hex[:8]}"  # the session database holds other tests' keys
    bad_scope = await keys_cli(database_url, "create", "--owner", owner, "--scopes", "admin,root")
    assert bad_scope.returncode == 2 and "root" in bad_scope.stderr
    assert "tly_" not in bad_scope.stdout
    naive = await keys_cli(database_url, "create", "--owner", owner, "--scopes", "admin",
                           "--expires-at", "2030-01-01T00:00:00")
    assert naive.returncode == 2 and "offset" in naive.stderr
    past = await keys_cli(database_url, "create", "--owner", owner, "--scopes", "admin",
                          "--expires-at", "2001-01-01T00:00:00Z")
    assert past.returncode == 2 and "expires_at" in past.stderr and "tly_" not in past.stdout
    for field, bad in (("owner", b"\xff"), ("name", b"caf\xe9")):  # not UTF-8: a TypeError from the encoder
        not_text = await keys_cli(database_url, "create", "--owner", owner, f"--{field}", bad, "--scopes", "admin")
        assert not_text.returncode == 2 and f"{field} must be UTF-8 text" in not_text.stderr, not_text.stderr
    unknown = await keys_cli(database_url, "revoke", str(uuid.uuid4()))
    assert unknown.returncode == 2 and "does not exist" in unknown.stderr
    # the app still answers as before (the failed commands changed nothing it can see)
    token = await mint_token(client.app, owner, ["admin"])
    head = await client.app[REPOSITORY].store.head()  # listings come from the read model: wait for it
    listed = await client.get(f"/v1/api-keys?owner={owner}&min_position={head}",
                              headers={**bearer(token), "Prefer": "wait=10"})
    assert listed.status == 200, await listed.text()
    assert [k["name"] for k in (await listed.json())["data"]] == [f"test key of {owner}"]


async def test_a_refused_key_leaves_an_empty_database_unmigrated(fresh_database_url: str) -> None:
    """The domain's rules are checked before anything is migrated."""
    refused = await keys_cli(fresh_database_url, "create", "--owner", " ", "--scopes", "admin")
    assert refused.returncode == 2 and "owner must not be empty" in refused.stderr, refused.stderr
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("select count(*) from pg_tables where schemaname = 'public'") == 0
    finally:
        await conn.close()
