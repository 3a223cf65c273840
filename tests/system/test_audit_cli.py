"""`python -m backend audit ...` as real processes: verifying an export needs no database at all;
export, verify and replay against a database."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncpg
import orjson
import pytest

from tests.integration.audit.support import audit_cli, export_file, fill_log, tamper

pytestmark = pytest.mark.system



async def test_verify_an_export_with_no_database(own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    log = await fill_log(own_pool, streams=4, versions=5)
    good = await export_file(own_pool, tmp_path / "log.ndjson")
    empty = tmp_path / "data"
    empty.mkdir()

    result = await audit_cli("verify", "--export", str(good), cwd=tmp_path, data_dir=empty)
    assert result.returncode == 0, result.stderr
    assert "events checked:  20" in result.stdout and "breaks:          0" in result.stdout

    lines = good.read_bytes().splitlines(keepends=True)
    event = orjson.loads(lines[9])
    event["data"]["amount"] += 1
    lines[9] = orjson.dumps(event) + b"\n"
    bad = tmp_path / "tampered.ndjson"
    bad.write_bytes(b"".join(lines))
    result = await audit_cli("verify", "--export", str(bad), "--json", cwd=tmp_path, data_dir=empty)
    assert result.returncode == 1, result.stderr
    report = orjson.loads(result.stdout)
    assert [(b["kind"], b["stream_id"], b["version"], b["position"]) for b in report["breaks"]] == [
        ("hash_mismatch", event["stream_id"], event["version"], 10)]
    assert log.position(event["stream_id"], event["version"]) == 10

    garbage = tmp_path / "garbage.ndjson"
    garbage.write_bytes(b"not json\n")
    result = await audit_cli("verify", "--export", str(garbage), cwd=tmp_path, data_dir=empty)
    assert result.returncode == 2 and "line 1" in result.stderr

    assert list(empty.iterdir()) == [] and not (tmp_path / ".data").exists(), "no embedded server was started"


async def test_a_ranged_export_is_reported_as_a_range(own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    """--partial checks positions 5.. only: the report must not call that the whole log."""
    await fill_log(own_pool, streams=2, versions=3)
    ranged = await export_file(own_pool, tmp_path / "range.ndjson", after=4)
    result = await audit_cli("verify", "--export", str(ranged), "--partial", "--quiet", cwd=tmp_path,
                             data_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "export: a range of the log (positions 5..6) [partial export]"


async def test_export_verify_and_replay_against_the_database(own_database_url: str, own_pool: asyncpg.Pool,
                                                             tmp_path: Path) -> None:
    log = await fill_log(own_pool, streams=3, versions=4)
    out = tmp_path / "export.ndjson"
    result = await audit_cli("export", "--out", str(out), database_url=own_database_url)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (await export_file(own_pool, tmp_path / "same.ndjson")).read_bytes()
    assert not out.with_name(out.name + ".partial").exists()

    result = await audit_cli("verify", database_url=own_database_url)
    assert result.returncode == 0 and "OK: every hash chain verifies" in result.stdout, result.stdout

    stream = log.streams[1]
    result = await audit_cli("replay", "--stream", stream, "--json", "--to-position", str(log.position(stream, 3)),
                             database_url=own_database_url)
    assert result.returncode == 0, result.stderr
    steps = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [s["event"]["version"] for s in steps] == [1, 2, 3]
    balance = 0
    for step in steps[1:]:
        amount = step["event"]["data"]["amount"]
        balance += amount if step["event"]["type"] == "WalletCredited" else -amount
        assert step["state"]["balance"] == balance and step["state"]["version"] == step["event"]["version"]

    await tamper(own_database_url, "delete from events where stream_id = $1 and version = 2", stream)
    result = await audit_cli("verify", "--stream", stream, database_url=own_database_url)
    assert result.returncode == 1
    assert f"missing_version: stream {stream} version 2 position {log.position(stream, 3)}" in result.stdout
    assert (await audit_cli("verify", "--export", str(out))).returncode == 0, "the earlier export still verifies"


async def test_export_out_refuses_what_is_not_a_regular_file(own_database_url: str, own_pool: asyncpg.Pool,
                                                             tmp_path: Path) -> None:
    await fill_log(own_pool, streams=1, versions=2)
    fifo, folder = tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for out in (fifo, folder):
        result = await audit_cli("export", "--quiet", "--out", str(out), database_url=own_database_url)
        assert result.returncode == 2
        assert result.stderr == f"tally: error: --out {out}: exists and is not a regular file\n"
    assert stat.S_ISFIFO(fifo.stat().st_mode) and folder.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["fifo", "folder"]


async def test_verifying_a_stream_with_no_events_is_an_error(own_database_url: str, own_pool: asyncpg.Pool) -> None:
    await fill_log(own_pool, streams=1, versions=2)
    result = await audit_cli("verify", "--stream", "wallet-none", database_url=own_database_url)
    assert result.returncode == 2 and result.stderr == "tally: error: stream 'wallet-none' has no events\n"
    assert not result.stdout


async def test_export_refuses_a_range_past_the_head(own_database_url: str, own_pool: asyncpg.Pool,
                                                    tmp_path: Path) -> None:
    await fill_log(own_pool, streams=1, versions=2)
    out = tmp_path / "e.ndjson"
    result = await audit_cli("export", "--quiet", "--to", "1000", "--out", str(out), database_url=own_database_url)
    assert result.returncode == 2 and result.stderr == "tally: error: --to 1000 is beyond the head of the log (2)\n"
    result = await audit_cli("export", "--quiet", "--after", "5", database_url=own_database_url)
    assert result.returncode == 2 and result.stderr == \
        "tally: error: --after 5 is beyond the head of the log (2): nothing to export\n"
    result = await audit_cli("export", "--quiet", "--after", "2", "--to", "1", database_url=own_database_url)
    assert result.returncode == 2 and result.stderr == "tally: error: --after 2 is beyond --to 1: nothing to export\n"
    assert not os.listdir(tmp_path)


async def test_an_empty_range_is_exported_as_such_not_as_a_backwards_one(own_database_url: str,
                                                                        own_pool: asyncpg.Pool) -> None:
    result = await audit_cli("export", database_url=own_database_url)
    assert result.returncode == 0 and not result.stdout, result.stderr
    assert result.stderr.splitlines() == ["exporting no event after position 0",
                                          "exported 0 events (no event after position 0)"]
    await fill_log(own_pool, streams=1, versions=2)
    result = await audit_cli("export", "--after", "2", database_url=own_database_url)
    assert result.returncode == 0 and not result.stdout, result.stderr
    assert result.stderr.splitlines()[-1] == "exported 0 events (no event after position 2)"
