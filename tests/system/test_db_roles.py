"""Least privilege: `db roles` makes an owner role (migrations) and an app role that serves commands,
reads, projections and streams, yet cannot rewrite the log by any way around the immutability trigger."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import asyncpg
import pytest

from backend.dbroles import scram_verifier
from tests.conftest import database_of_its_own
from tests.system.ledger_checks import check_ledger
from tests.system.procs import Process, as_user, create_key, run_backend

pytestmark = pytest.mark.system

OWNER_PASSWORD = "owner-pw-Zq81"
APP_PASSWORD = "app-pw-Kx27"


@dataclass(frozen=True)
class Deployment:
    admin_url: str
    owner: str
    app: str

    @property
    def owner_url(self) -> str:
        return as_user(self.admin_url, self.owner, OWNER_PASSWORD)

    @property
    def app_url(self) -> str:
        return as_user(self.admin_url, self.app, APP_PASSWORD)

    def roles(self, *flags: str) -> tuple[int, str, str]:
        result = run_backend("db", "roles", *flags, "--owner-role", self.owner, "--app-role", self.app,
                             env={"DATABASE_URL": self.admin_url, "TALLY_OWNER_PASSWORD": OWNER_PASSWORD,
                                  "TALLY_APP_PASSWORD": APP_PASSWORD})
        for text in (result.stdout, result.stderr):
            assert OWNER_PASSWORD not in text and APP_PASSWORD not in text
        return result.returncode, result.stdout, result.stderr


async def drop_roles(admin_url: str, *roles: str) -> None:
    """Roles are cluster-wide: revoke what they hold and drop them (before the database goes)."""
    conn = await asyncpg.connect(admin_url)
    try:
        for role in roles:  # one at a time: both in one `drop owned` trips over their shared default ACL
            if await conn.fetchval("select 1 from pg_roles where rolname = $1", role):
                await conn.execute(f'drop owned by "{role}" cascade')
        for role in roles:
            await conn.execute(f'drop role if exists "{role}"')
    finally:
        await conn.close()


@pytest.fixture
def roles_database_url(admin_dsn: str) -> Iterator[str]:
    """An empty database; it and every role made here are named roles_*, so that leftovers on a shared
    server are recognisable as this module's."""
    with database_of_its_own(admin_dsn, migrated=False, prefix="roles_") as dsn:
        yield dsn


@pytest.fixture
def deployment(roles_database_url: str) -> Iterator[Deployment]:
    """An empty database set up as in production: roles, migrate as the owner, roles again."""
    suffix = uuid.uuid4().hex[:10]
    deployed = Deployment(roles_database_url, f"roles_owner_{suffix}", f"roles_app_{suffix}")
    try:
        code, _, stderr = deployed.roles("--apply")
        assert code == 0, stderr
        assert "not migrated yet" in stderr
        migrated = run_backend("migrate", env={"DATABASE_URL": deployed.owner_url})
        assert migrated.returncode == 0, migrated.stderr
        code, _, stderr = deployed.roles("--apply")
        assert (code, stderr) == (0, ""), stderr
        yield deployed
    finally:
        asyncio.run(drop_roles(roles_database_url, deployed.owner, deployed.app))


def test_print_gives_the_sql_without_a_password() -> None:
    result = run_backend("db", "roles", "--print", "--owner-role", "ops_owner", "--app-role", "ops_app",
                         env={"TALLY_OWNER_PASSWORD": OWNER_PASSWORD, "TALLY_APP_PASSWORD": APP_PASSWORD})
    assert result.returncode == 0, result.stderr
    assert OWNER_PASSWORD not in result.stdout and APP_PASSWORD not in result.stdout
    assert 'alter role "ops_app" with login nosuperuser' in result.stdout
    assert result.stdout.count("password 'SCRAM-SHA-256$4096:") == 2
    refused = run_backend("db", "roles", "--print", "--app-role", "x; drop table events", env={})
    assert refused.returncode == 2 and "not a plain role name" in refused.stderr

    same = run_backend("db", "roles", "--print", "--owner-role", "roles_x", "--app-role", "roles_x", env={})
    assert same.returncode == 2 and same.stderr == "tally: error: the owner role and the app role must differ\n"


ATTRIBUTES = {"superuser": "rolsuper", "replication": "rolreplication", "bypassrls": "rolbypassrls"}
"""Each role attribute the command would take away, and its pg_roles column."""


@pytest.mark.parametrize("use", ["--owner-role", "--app-role"])
@pytest.mark.parametrize("attribute", ATTRIBUTES)
async def test_a_role_with_powers_the_command_would_strip_is_refused(roles_database_url: str, attribute: str,
                                                                     use: str) -> None:
    """A superuser (or a role with REPLICATION or BYPASSRLS) named by mistake would silently lose that power:
    the command refuses it before changing anything, and so does the SQL of --print, run by hand."""
    suffix = uuid.uuid4().hex[:10]
    strong, other = f"roles_strong_{suffix}", f"roles_other_{suffix}"
    owner, app = (strong, other) if use == "--owner-role" else (other, strong)
    conn = await asyncpg.connect(roles_database_url)
    try:
        await conn.execute(f'create role "{strong}" {attribute}')
        result = run_backend("db", "roles", "--apply", "--owner-role", owner, "--app-role", app,
                             env={"DATABASE_URL": roles_database_url})
        kind = "owner" if use == "--owner-role" else "app"
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f'tally: error: refusing to use "{strong}" as the {kind} role: ')
        assert attribute in result.stderr.lower() and result.stderr.count("\n") == 1 and result.stdout == ""
        printed = run_backend("db", "roles", "--print", "--owner-role", owner, "--app-role", app, env={})
        with pytest.raises(asyncpg.RaiseError, match=f'refusing to use "{strong}"'):
            await conn.execute(printed.stdout)
        await conn.execute("rollback")  # the SQL's own transaction, left aborted as psql would leave it
        assert await conn.fetchval(f"select {ATTRIBUTES[attribute]} from pg_roles where rolname = $1", strong)
        assert not await conn.fetchval("select 1 from pg_roles where rolname = $1", other)
    finally:
        await conn.close()
        await drop_roles(roles_database_url, strong, other)


async def test_the_role_running_the_command_is_refused(roles_database_url: str) -> None:
    """It would be stripped of what lets it run the command (here: superuser), mid-way through."""
    admin = f"roles_admin_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(roles_database_url)
    try:
        await conn.execute(f'create role "{admin}" login superuser')
        result = run_backend("db", "roles", "--apply", "--owner-role", admin, "--app-role", f"{admin}_app",
                             env={"DATABASE_URL": as_user(roles_database_url, admin)})
        assert result.returncode == 2, result.stderr
        assert result.stderr == f'tally: error: refusing to use "{admin}" as the owner role: it is the role ' \
                                "running this\n"
        assert await conn.fetchval("select rolsuper from pg_roles where rolname = $1", admin)
    finally:
        await conn.close()
        await drop_roles(roles_database_url, admin, f"{admin}_app")


async def test_the_verifier_is_the_one_postgresql_computes(deployment: Deployment) -> None:
    """PostgreSQL stores our verifier as it is (a malformed one would be hashed as a password), and
    hashing a password itself gives what scram_verifier computes from the same salt."""
    conn = await asyncpg.connect(deployment.admin_url)
    try:
        stored = await conn.fetchval("select rolpassword from pg_authid where rolname = $1", deployment.app)
        assert stored.startswith("SCRAM-SHA-256$4096:")
        await conn.execute("set password_encryption = 'scram-sha-256'")
        await conn.execute(f"alter role \"{deployment.app}\" password 'pencil'")
        by_postgres = await conn.fetchval("select rolpassword from pg_authid where rolname = $1", deployment.app)
    finally:
        await conn.close()
    assert recomputed(by_postgres, "pencil") == by_postgres
    assert recomputed(stored, APP_PASSWORD) == stored


def recomputed(verifier: str, password: str) -> str:
    """scram_verifier of password with the salt and iteration count of a verifier PostgreSQL stored."""
    iterations, salt = verifier.split("$")[1].split(":")
    return scram_verifier(password, base64.b64decode(salt), int(iterations))


PASSWORDS = {
    "ascii": "pencil",
    "soft hyphen (mapped to nothing)": "pen\u00adcil",
    "no-break space (mapped to a space)": "pen\u00a0cil",
    "ligature (NFKC)": "\ufb01le \u2168",
    "only mapped to nothing (empty: the bytes as they are)": "\u00ad\ufeff",
    "zero width space (both a space and nothing: PostgreSQL maps spaces first)": "pen\u200bcil",
    "private use (prohibited: the bytes as they are)": "\ufb01\u00ad\ue000",
    "left-to-right mark (prohibited)": "\ufb01\u200e",
    "unassigned in Unicode 3.2 (prohibited)": "\ufb01\U0001f600",
    "right-to-left with left-to-right (bidi)": "\u05d0\ufb01\u05d0",
    "right-to-left throughout": "\u05d0\ufb4f\u05d1",
    "left-to-right only after NFKC (PostgreSQL checks before)": "\u05d0\u2122\u05d0",
}


@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS.keys())
async def test_a_password_is_prepared_as_postgresql_prepares_it(admin_dsn: str, password: str) -> None:
    """SASLprep, and its fallback to the bytes as given: a verifier computed otherwise has keys that the
    password typed at login (prepared by libpq the same way) never matches."""
    role = f"roles_t_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("set password_encryption = 'scram-sha-256'")
        await conn.execute(f"create role \"{role}\" password '{password}'")
        by_postgres = await conn.fetchval("select rolpassword from pg_authid where rolname = $1", role)
    finally:
        await conn.execute(f'drop role if exists "{role}"')
        await conn.close()
    assert recomputed(by_postgres, password) == by_postgres


async def test_the_app_role_serves_everything_but_cannot_rewrite_history(deployment: Deployment) -> None:
    app_env = {"APPLY_MIGRATIONS": "false"}
    token = create_key(deployment.app_url, env=app_env)
    server = Process.serve("serve", deployment.app_url, RUN_PROJECTIONS="false", **app_env).start()
    worker = Process.projections("projections", deployment.app_url).start()  # APPLY_MIGRATIONS on: a check only
    try:
        server.wait_ready()
        worker.wait_ready()
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(base_url=server.base, headers=headers) as http:
            async with http.post("/v1/wallets", json={"owner": "roles", "currency": "USD"}) as reply:
                assert reply.status == 201, await reply.text()
                wallet_id = (await reply.json())["wallet_id"]
            credit = {"amount": 500, "reference": "seed"}
            answers = []
            for _ in range(2):  # the second is a replay from idempotency_keys
                async with http.post(f"/v1/wallets/{wallet_id}/credits", json=credit,
                                     headers={"Idempotency-Key": "roles-credit"}) as reply:
                    assert reply.status == 200, await reply.text()
                    answers.append(await reply.json())
            assert answers[0] == answers[1]
            async with http.post(f"/v1/wallets/{wallet_id}/debits", json={"amount": 120, "reference": "d"}) as reply:
                assert reply.status == 200, await reply.text()
            async with http.post(f"/v1/wallets/{wallet_id}/reservations",
                                 json={"amount": 30, "ttl_seconds": 600}) as reply:
                assert reply.status in (200, 201), await reply.text()
                position = (await reply.json())["position"]
            async with http.get(f"/v1/wallets/{wallet_id}", params={"min_position": str(position)}) as reply:
                assert reply.status == 200, await reply.text()
                wallet = await reply.json()
            assert (wallet["balance"], wallet["reserved"]) == (380, 30)
            async with http.get("/v1/stats", params={"min_position": str(position)}) as reply:
                assert reply.status == 200, await reply.text()
            positions = []
            async with http.get(f"/v1/streams/wallets/{wallet_id}", params={"after": "0"}) as stream:
                assert stream.status == 200
                async with asyncio.timeout(10):
                    async for line in stream.content:
                        if line.startswith(b"id:"):
                            positions.append(int(line[3:]))
                            if positions[-1] >= position:
                                break
            # the wallet's state at the start (id 0), then opened, credited, debited, reserved
            assert positions == [0, *range(position - 3, position + 1)]
        await check_ledger(deployment.app_url, owner_dsn=deployment.owner_url)

        # The owner rebuilds every read model (new tables); the app role still writes and reads them.
        rebuilt = run_backend("projections", "rebuild", "--all", env={"DATABASE_URL": deployment.owner_url})
        assert rebuilt.returncode == 0, rebuilt.stderr
        async with aiohttp.ClientSession(base_url=server.base, headers=headers) as http:
            async with http.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 7, "reference": "after"}) as reply:
                assert reply.status == 200, await reply.text()
                position = (await reply.json())["position"]
            async with http.get(f"/v1/wallets/{wallet_id}", params={"min_position": str(position)}) as reply:
                assert reply.status == 200, await reply.text()
                assert (await reply.json())["balance"] == 387
        await check_ledger(deployment.app_url, owner_dsn=deployment.owner_url)

        conn = await asyncpg.connect(deployment.app_url)
        try:
            before = await conn.fetchval("select count(*) from events")
            for attack in ("set session_replication_role = replica",
                           "set local session_replication_role = replica",
                           "alter table events disable trigger all",
                           "alter table events disable trigger events_no_update_delete",
                           "update events set data = '{}'::jsonb",
                           "delete from events",
                           "truncate events",
                           "drop table events",
                           "create table events_copy (like events)",
                           "lock table events in access exclusive mode",
                           "update merkle_nodes set hash = hash",
                           "delete from merkle_nodes",
                           "truncate audit_checkpoints",
                           "delete from audit_checkpoints",
                           "alter table audit_checkpoints disable trigger all"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match=r"permission denied|must be owner"):
                    async with conn.transaction():
                        await conn.execute(attack)
            assert await conn.fetchval("select count(*) from events") == before
            await conn.execute("grant update, delete on events to public")  # a warning: it holds no such grant
            assert not await conn.fetchval("select has_table_privilege('events', 'update')")
            if await conn.fetchval("select current_setting('server_version_num')::int") >= 170000:
                assert await conn.fetchval("select has_table_privilege('wallet_balances', 'maintain')")
                assert not await conn.fetchval("select has_table_privilege('events', 'maintain')")
        finally:
            await conn.close()
        assert server.stop() == 0, server.output()
        assert worker.stop() == 0, worker.output()
    finally:
        server.kill()
        worker.kill()


def test_an_unreachable_database_is_one_line_and_status_2() -> None:
    url = "postgresql://roles_nobody:hunter2-secret@127.0.0.1:1/roles_none"
    result = run_backend("db", "roles", "--apply", env={"DATABASE_URL": url, "TALLY_OWNER_PASSWORD": OWNER_PASSWORD})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tally: error: cannot connect to database postgresql://roles_nobody:***@127.0.0.1:1/")
    assert result.stderr.count("\n") == 1 and "hunter2-secret" not in result.stderr + result.stdout
    assert OWNER_PASSWORD not in result.stderr + result.stdout and result.stdout == ""
