"""`python -m backend db roles --print | --apply`: the two PostgreSQL roles of a production deployment.

The owner role owns the schema: it runs `migrate`, projection rebuilds and `audit diff-projections`.
The app role is what `serve` and `python -m projections` connect as (with APPLY_MIGRATIONS=false). It
reads every table and writes the ones the service writes, but on `events` it may only SELECT and
INSERT: without UPDATE, DELETE or TRUNCATE, without ownership (ALTER TABLE ... DISABLE TRIGGER) and
without superuser (SET session_replication_role = replica), it cannot rewrite history even around
the immutability trigger.

The grants are computed from the catalog when the SQL runs, so the command is re-run after every
`migrate` (a new append-only table must be added to APPEND_ONLY first). Default privileges give the
app role SELECT, INSERT, UPDATE and DELETE on tables the owner creates later, so the read models a
rebuild swaps in stay writable; the re-run is what narrows a new append-only table.

Passwords come from the environment only (TALLY_OWNER_PASSWORD, TALLY_APP_PASSWORD) and are turned
into SCRAM-SHA-256 verifiers here: neither the printed SQL nor the server's statement log ever holds a
password. Without one, a new role gets none (certificate or peer authentication) and an existing
role keeps its own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import re
import secrets
import stringprep
import sys
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.config import env_help

if TYPE_CHECKING:
    from backend.config import Settings

SCHEMA = "public"
APPEND_ONLY = ("events", "merkle_nodes", "audit_checkpoints")
"""Tables whose rows are history (the log, the Merkle tree's stored subtrees, signed checkpoints): the
app role may SELECT and INSERT them, nothing else."""
READ_ONLY = ("schema_migrations",)
"""Tables only `migrate` writes."""

OWNER_ENV, APP_ENV = "TALLY_OWNER_ROLE", "TALLY_APP_ROLE"
OWNER_PASSWORD_ENV, APP_PASSWORD_ENV = "TALLY_OWNER_PASSWORD", "TALLY_APP_PASSWORD"
SCRAM_ITERATIONS = 4096
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class RolesError(Exception):
    pass


def add_subcommands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = subparsers.add_parser("db", help="database administration")
    commands = db.add_subparsers(dest="db_command", required=True)
    roles = commands.add_parser(
        "roles", help="the owner role (migrations) and the least-privileged app role (serve, projections)",
        description=f"Passwords are read from {OWNER_PASSWORD_ENV} and {APP_PASSWORD_ENV} (never options) and "
                    "written as SCRAM-SHA-256 verifiers. Re-run --apply after every migrate.",
        epilog=env_help(OWNER_ENV, APP_ENV, OWNER_PASSWORD_ENV, APP_PASSWORD_ENV),
    )
    action = roles.add_mutually_exclusive_group(required=True)
    action.add_argument("--print", action="store_true", dest="print_sql", help="print the SQL (for psql) and exit")
    action.add_argument("--apply", action="store_true",
                        help="run the SQL on the database, connected as a superuser (DIRECT_DATABASE_URL if set, "
                             "else DATABASE_URL)")
    roles.add_argument("--owner-role", default=os.environ.get(OWNER_ENV, "tally_owner"),
                       help=f"owns the schema and runs migrations (default: {OWNER_ENV} or tally_owner)")
    roles.add_argument("--app-role", default=os.environ.get(APP_ENV, "tally_app"),
                       help=f"serve and python -m projections connect as it (default: {APP_ENV} or tally_app)")


def role_name(value: str) -> str:
    if not _ROLE_NAME.fullmatch(value):  # match with $ would let a trailing newline through
        raise RolesError(f"not a plain role name (lower case letters, digits, _): {value!r}")
    return value


_PROHIBITED = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
               stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
               stringprep.in_table_c9, stringprep.in_table_a1)
"""SASLprep's prohibited output (RFC 4013 section 2.3), and code points unassigned in Unicode 3.2."""


def saslprep(password: bytes) -> bytes:
    """The bytes PostgreSQL hashes for a password, and libpq at login: SASLprep (RFC 4013) as
    src/common/saslprep.c applies it, or the password unchanged where that fails (not UTF-8, nothing
    left after mapping, a prohibited character, mixed directions). A verifier from other bytes never
    matches what the client proves at login."""
    if password.isascii():
        return password
    try:
        text = password.decode()
    except UnicodeDecodeError:
        return password
    mapped = "".join(" " if stringprep.in_table_c12(c) else "" if stringprep.in_table_b1(c) else c for c in text)
    # PostgreSQL checks the mapped text, not its NFKC form as RFC 3454 says: so does this, to match it
    if not mapped or any(prohibited(c) for c in mapped for prohibited in _PROHIBITED) or _mixes_directions(mapped):
        return password
    return unicodedata.normalize("NFKC", mapped).encode()


def _mixes_directions(text: str) -> bool:
    """RFC 3454 section 6: right-to-left text has no left-to-right character and starts and ends right-to-left."""
    if not any(map(stringprep.in_table_d1, text)):
        return False
    return (any(map(stringprep.in_table_d2, text))
            or not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])))


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5803 layout), computed here. Bytes of the
    environment that are not UTF-8 come back as they were (surrogateescape), as libpq would send them."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    raw = password.encode("utf-8", "surrogateescape")
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(raw), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    owner_verifier: str | None = None
    app_verifier: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Roles:
        env = os.environ if environ is None else environ
        owner, app = role_name(args.owner_role), role_name(args.app_role)
        if owner == app:
            raise RolesError("the owner role and the app role must differ")
        owner_password, app_password = env.get(OWNER_PASSWORD_ENV), env.get(APP_PASSWORD_ENV)
        return cls(owner, app,
                   scram_verifier(owner_password) if owner_password else None,
                   scram_verifier(app_password) if app_password else None)

    def refusal(self) -> str:
        """The SQL's first statement: `alter role` below would silently strip a superuser (or REPLICATION,
        BYPASSRLS) named by mistake, or the role running it. In the SQL itself, so that the output of
        --print, which sees no catalog, refuses too when psql runs it."""
        return f"""\
-- Refuse, before any change, a role that `alter role` would strip of powers, or the one running this.
do $$
declare
    r record;
begin
    for r in
        select rolname, case rolname when '{self.owner}' then 'owner' else 'app' end as use,
               case when rolname in (current_user, session_user) then 'it is the role running this'
                    when rolsuper then 'it is a superuser, which this would take away'
                    when rolreplication then 'it has REPLICATION, which this would take away'
                    when rolbypassrls then 'it has BYPASSRLS, which this would take away' end as why
        from pg_roles where rolname in ('{self.owner}', '{self.app}')
        order by rolname <> '{self.owner}'
    loop
        if r.why is not null then
            raise exception 'refusing to use "%" as the % role: %', r.rolname, r.use, r.why;
        end if;
    end loop;
end
$$;"""

    def sql(self) -> str:
        """One transaction; safe to run again (it converges: creates what is missing, narrows what is wide)."""
        owner, app = f'"{self.owner}"', f'"{self.app}"'
        append_only = ", ".join(f"'{t}'" for t in APPEND_ONLY)
        read_only = ", ".join(f"'{t}'" for t in READ_ONLY)
        limits = "login nosuperuser nocreatedb nocreaterole noreplication nobypassrls"

        def password(verifier: str | None) -> str:
            return f" password '{verifier}'" if verifier else ""

        return f"""\
begin;
{self.refusal()}
do $$
begin
    if not exists (select from pg_roles where rolname = '{self.owner}') then
        create role {owner};
    end if;
    if not exists (select from pg_roles where rolname = '{self.app}') then
        create role {app};
    end if;
end
$$;
alter role {owner} with {limits}{password(self.owner_verifier)};
alter role {app} with {limits}{password(self.app_verifier)};

-- The owner creates and alters the schema's objects; the app role only connects and uses them.
do $$
begin
    execute format('grant connect, create, temporary on database %I to {owner}', current_database());
    execute format('grant connect on database %I to {app}', current_database());
    execute format('revoke create on database %I from {app}', current_database());
end
$$;
revoke create on schema {SCHEMA} from public;
grant usage, create on schema {SCHEMA} to {owner};
grant usage on schema {SCHEMA} to {app};
revoke create on schema {SCHEMA} from {app};

-- Tables, sequences and functions migrated by another role (e.g. the superuser) pass to the owner.
do $$
declare
    r record;
begin
    for r in
        select c.oid::regclass as name, c.relkind
        from pg_class c
        where c.relnamespace = '{SCHEMA}'::regnamespace and c.relkind in ('r', 'p', 'v', 'm', 'S')
          and c.relowner <> '{self.owner}'::regrole
          and not exists (select from pg_depend d where d.classid = 'pg_class'::regclass and d.objid = c.oid
                          and d.deptype in ('e', 'a', 'i'))
    loop
        execute format('alter %s %s owner to {owner}',
                       case r.relkind when 'S' then 'sequence' when 'v' then 'view'
                                      when 'm' then 'materialized view' else 'table' end, r.name);
    end loop;
    for r in
        select p.oid::regprocedure as name
        from pg_proc p
        where p.pronamespace = '{SCHEMA}'::regnamespace and p.proowner <> '{self.owner}'::regrole
          and not exists (select from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid
                          and d.deptype = 'e')
    loop
        execute format('alter routine %s owner to {owner}', r.name);
    end loop;
end
$$;

-- The app role: every privilege it had is recomputed from here.
revoke all on all tables in schema {SCHEMA} from {app};
revoke all on all sequences in schema {SCHEMA} from {app};
do $$
declare
    t text;
    -- PostgreSQL 17 and later: the runners' ANALYZE of their read models (earlier, only an owner may)
    maintain text := case when current_setting('server_version_num')::int >= 170000 then ', maintain' else '' end;
begin
    for t in
        select c.relname from pg_class c
        where c.relnamespace = '{SCHEMA}'::regnamespace and c.relkind in ('r', 'p')
    loop
        execute format('grant %s on {SCHEMA}.%I to {app}',
                       case when t in ({append_only}) then 'select, insert'
                            when t in ({read_only}) then 'select'
                            else 'select, insert, update, delete' || maintain end, t);
    end loop;
    if maintain <> '' then
        execute 'alter default privileges for role {owner} grant maintain on tables to {app}';
    end if;
end
$$;
grant usage, select on all sequences in schema {SCHEMA} to {app};
grant execute on all functions in schema {SCHEMA} to {app};
alter default privileges for role {owner} grant select, insert, update, delete on tables to {app};
alter default privileges for role {owner} grant usage, select on sequences to {app};
commit;
"""


async def apply(settings: Settings, roles: Roles) -> None:
    import asyncpg

    from backend.db import direct_connection
    from backend.dsn import database_dsn

    async with database_dsn(settings) as dsn, direct_connection(settings.direct_dsn(dsn), settings) as conn:
        missing = [t for t in APPEND_ONLY + READ_ONLY
                   if await conn.fetchval("select to_regclass($1)", f"{SCHEMA}.{t}") is None]
        try:
            await conn.execute(roles.sql())
        except asyncpg.RaiseError as exc:  # Roles.refusal's: nothing was changed
            raise RolesError(str(exc)) from None
    print(f"roles {roles.owner} (owner) and {roles.app} (app) are ready")
    if missing:
        print(f"tally: the database is not migrated yet ({', '.join(missing)} missing): run "
              f"`python -m backend migrate` as {roles.owner}, then this command again", file=sys.stderr)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """A database that cannot be reached or refuses the SQL is left to the caller, run_tool, which reports
    it as every subcommand does (one line, password masked, status 2)."""
    try:
        roles = Roles.from_args(args)
        if args.print_sql:
            print(roles.sql(), end="")
            return 0
        asyncio.run(apply(settings, roles))
    except RolesError as exc:
        print(f"tally: error: {exc}", file=sys.stderr)
        return 2
    return 0
