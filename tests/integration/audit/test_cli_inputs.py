"""The audit CLI given inputs it cannot check (hostile files, odd server answers, bad options): one
`tally: error:` line and exit status 2, or a reported break (1); never a traceback, never a secret."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest.mock import patch

import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backend.audit.cli import open_output
from backend.audit.export import MAX_LINE_BYTES, line_batches
from backend.audit.signing import Signer, raw_public
from tests.conftest import ROOT
from tests.integration.audit.support import audit_cli

TIMESTAMP = "2026-01-01T00:00:00.000000Z"


def event_line(position: int, version: int = 1) -> bytes:
    return orjson.dumps({"position": position, "stream_id": "wallet-a", "version": version, "type": "T",
                         "data": {}, "metadata": {}, "event_id": "e", "recorded_at": TIMESTAMP,
                         "hash": "00" * 32}) + b"\n"


def write_export(path: Path, *positions: int) -> Path:
    path.write_bytes(b"".join(event_line(p, v) for v, p in enumerate(positions, 1)))
    return path


def write_checkpoint(path: Path, size: int, root: bytes = bytes(32), timestamp: str = TIMESTAMP) -> Path:
    signer = Signer(Ed25519PrivateKey.generate())
    document = signer.sign(size, root, timestamp).as_dict()
    path.write_bytes(orjson.dumps({**document, "public_key": raw_public(signer.public).hex()}))
    return path


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a refused command prints (and that it exited 2, with no traceback)."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tally: error: "), result.stderr
    return lines[0]


async def test_positions_no_log_has_are_reported_against_a_checkpoint(tmp_path: Path) -> None:
    export = write_export(tmp_path / "e.ndjson", 1, -5, 2**63)
    checkpoint = write_checkpoint(tmp_path / "cp.json", 3)
    result = await audit_cli("verify", "--export", str(export), "--checkpoint", str(checkpoint), "--json")
    assert result.returncode == 1, result.stderr
    report = orjson.loads(result.stdout)
    assert {"position_out_of_order", "missing_position"} <= {b["kind"] for b in report["breaks"]}
    assert not report["checkpoint"]["root_ok"]

    baseline = write_export(tmp_path / "b.ndjson", -1)
    result = await audit_cli("verify", "--export", str(export), "--checkpoint", str(checkpoint),
                             "--baseline", str(baseline))
    assert result.returncode == 1, result.stderr
    assert "does not give the checkpoint's root either" in result.stdout


async def test_a_bad_baseline_line_names_the_file(tmp_path: Path) -> None:
    export = write_export(tmp_path / "e.ndjson", 1)
    baseline = tmp_path / "b.ndjson"
    baseline.write_bytes(b"not json\n")
    checkpoint = write_checkpoint(tmp_path / "cp.json", 1)
    result = await audit_cli("verify", "--export", str(export), "--checkpoint", str(checkpoint),
                             "--baseline", str(baseline))
    assert f"{baseline}: line 1: not an exported event" in one_error_line(result)


def test_a_closed_stdin_is_one_line() -> None:
    result = subprocess.run(["sh", "-c", 'exec "$0" -m backend audit verify --export - <&-', sys.executable],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "stdin is closed" in one_error_line(result)


async def odd_server(aiohttp_server: Any, body: bytes, status: int = 200) -> str:
    """A server answering every GET with `body`: the URL to give --url."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


ODD_ANSWERS = [b"{}", b"[1,2]", b"null", b'"text"',
               orjson.dumps({"leaf_hash": "zz" * 32, "audit_path": ["not hex"]}),
               orjson.dumps({"leaf_hash": "00" * 32, "audit_path": {"a": 1}})]


@pytest.mark.parametrize("body", ODD_ANSWERS)
async def test_odd_proofs_from_a_server_are_one_line(aiohttp_server: Any, tmp_path: Path, body: bytes) -> None:
    url = await odd_server(aiohttp_server, body)
    export = write_export(tmp_path / "e.ndjson", 1, 2)
    result = await audit_cli("verify", "--export", str(export), "--checkpoint",
                             str(write_checkpoint(tmp_path / "cp.json", 2)), "--url", url)
    # the export already fails the checkpoint: the server's odd answer only keeps it from being located
    assert result.returncode == 1 and not result.stderr, result.stderr
    tree = [line for line in result.stdout.splitlines() if line.startswith("tree:")]
    assert len(tree) == 1 and "; cannot locate the change: GET /v1/audit/proofs/inclusion: the answer is not a " \
        "Tally proof (" in tree[0], result.stdout
    assert "FAILED: the export does not match the signed checkpoint" in result.stdout
    old, new = write_checkpoint(tmp_path / "old.json", 1), write_checkpoint(tmp_path / "new.json", 2)
    result = await audit_cli("consistency", str(old), str(new), "--url", url)
    assert "GET /v1/audit/proofs/consistency: the answer is not a Tally proof (" in one_error_line(result)
    result = await audit_cli("checkpoint", "--out", str(tmp_path / "out.json"), "--url", url)
    assert "GET /v1/audit/public-key: the server sends no public key" in one_error_line(result)
    key = tmp_path / "key.hex"
    key.write_text("11" * 32)
    result = await audit_cli("checkpoint", "--out", str(tmp_path / "out.json"), "--url", url,
                             "--public-key", str(key))
    assert "GET /v1/audit/checkpoints/latest: not a checkpoint" in one_error_line(result)
    assert not (tmp_path / "out.json").exists()


async def test_an_html_error_page_is_a_short_excerpt_and_a_url_password_is_masked(aiohttp_server: Any,
                                                                                  tmp_path: Path) -> None:
    url = await odd_server(aiohttp_server, b"<html>\n<body>\n" + b"<p>Not Found</p>\n" * 50, status=404)
    old, new = write_checkpoint(tmp_path / "old.json", 1), write_checkpoint(tmp_path / "new.json", 2)
    line = one_error_line(await audit_cli("consistency", str(old), str(new), "--url", url))
    assert line.startswith("tally: error: GET /v1/audit/proofs/consistency: 404 <html> <body>") and len(line) < 200
    line = one_error_line(await audit_cli("consistency", str(old), str(new), "--url", "http://user:s3cret@127.0.0.1:9/"))
    assert "s3cret" not in line and "user:***@127.0.0.1:9" in line


async def test_a_key_with_control_characters_is_refused_unsent(tmp_path: Path) -> None:
    old, new = write_checkpoint(tmp_path / "old.json", 1), write_checkpoint(tmp_path / "new.json", 2)
    secret = "abc-secret\r\nX-Injected: 1"
    for result in (await audit_cli("consistency", str(old), str(new), "--key", secret, "--url", "http://127.0.0.1:9"),
                   await audit_cli("consistency", str(old), str(new), "--url", "http://127.0.0.1:9",
                                   TALLY_API_KEY=secret)):
        line = one_error_line(result)
        assert "API key" in line and "abc-secret" not in result.stderr + result.stdout


async def test_input_without_an_end_of_line_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    export = tmp_path / "e.ndjson"
    export.write_bytes(event_line(1) + event_line(2, 2) + b" " * (MAX_LINE_BYTES + 1))
    line = one_error_line(await audit_cli("verify", "--export", str(export)))
    assert f"{export}: line 3: longer than 16 MiB" in line
    result = await audit_cli("verify", "--export", "/dev/zero")
    assert "line 1: longer than 16 MiB" in one_error_line(result)
    checkpoint = write_checkpoint(tmp_path / "cp.json", 1)
    for option in ("--public-key", "--checkpoint"):
        args = {"--checkpoint": str(checkpoint), option: "/dev/zero"}
        result = await audit_cli("verify", "--export", str(export), *[x for kv in args.items() for x in kv])
        assert "/dev/zero: larger than 1 MiB" in one_error_line(result)


def test_lines_split_across_reads_are_whole(tmp_path: Path) -> None:
    lines = [b"x" * size for size in (0, 1, 5, 17, 3)]
    path = tmp_path / "lines"
    path.write_bytes(b"\n".join(lines))
    with path.open("rb") as file, patch("backend.audit.export.READ_SIZE", 4):
        found = [(number, line) for first, batch in line_batches(file) for number, line in enumerate(batch, first)]
    assert found == list(enumerate(lines, 1))


async def test_checkpoint_out_only_replaces_a_regular_file(aiohttp_server: Any, tmp_path: Path) -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    key = tmp_path / "key.hex"
    key.write_text(raw_public(signer.public).hex())
    url = await odd_server(aiohttp_server, orjson.dumps(signer.sign(1, bytes(32), TIMESTAMP).as_dict()))
    fifo, folder, regular = tmp_path / "fifo", tmp_path / "folder", tmp_path / "cp.json"
    os.mkfifo(fifo)
    folder.mkdir()
    for out in (fifo, folder):
        result = await audit_cli("checkpoint", "--out", str(out), "--url", url, "--public-key", str(key))
        assert f"--out {out}: exists and is not a regular file" in one_error_line(result)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and folder.is_dir()
    regular.write_bytes(b"old")
    result = await audit_cli("checkpoint", "--out", str(regular), "--url", url, "--public-key", str(key))
    assert result.returncode == 0, result.stderr
    assert orjson.loads(regular.read_bytes())["tree_size"] == 1
    assert sorted(os.listdir(tmp_path)) == ["cp.json", "fifo", "folder", "key.hex"]


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "export.ndjson"
    out.write_bytes(b"kept")
    with pytest.raises(OSError, match="disk full"), open_output(out) as file:
        file.write(b"half")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["export.ndjson"] and out.read_bytes() == b"kept"


async def test_a_stream_with_no_events_in_the_export_is_an_error(tmp_path: Path) -> None:
    export = write_export(tmp_path / "e.ndjson", 1)
    result = await audit_cli("verify", "--export", str(export), "--stream", "wallet-typo")
    assert one_error_line(result) == "tally: error: stream 'wallet-typo' has no events" and not result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["export", "--to", str(2**63)], "argument --to: must be from 0 to 9223372036854775807"),
    (["export", "--after", str(2**63)], "argument --after: must be from 0 to 9223372036854775807"),
    (["replay", "--stream", os.fsdecode(b"wallet-\xff")], "argument --stream: not valid UTF-8"),
    (["replay", "--stream", "w" * 257], "argument --stream: must be 1 to 256 characters"),
    (["verify", "--stream", os.fsdecode(b"\xff")], "argument --stream: not valid UTF-8"),
])
async def test_what_the_store_cannot_hold_is_refused_before_the_database(args: list[str], message: str) -> None:
    result = await audit_cli(*args, database_url="postgresql://nobody@127.0.0.1:9/none")
    assert result.returncode == 2 and message in result.stderr and "Error" not in result.stderr, result.stderr


async def test_consistency_reports_a_bad_signature_as_json_and_refuses_swapped_checkpoints(tmp_path: Path) -> None:
    old = write_checkpoint(tmp_path / "old.json", 1)
    new = write_checkpoint(tmp_path / "new.json", 2, timestamp="2026-01-02T00:00:00.000000Z")
    forged = tmp_path / "forged.json"
    unsigned = base64.b64encode(bytes(64)).decode()
    forged.write_bytes(orjson.dumps({**orjson.loads(new.read_bytes()), "signature": unsigned}))
    result = await audit_cli("consistency", str(old), str(forged), "--json", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1, result.stderr
    assert orjson.loads(result.stdout) == {"ok": False, "old": 1, "new": 2,
                                           "detail": f"checkpoint {forged}: signature invalid"}

    line = one_error_line(await audit_cli("consistency", str(new), str(old), "--url", "http://127.0.0.1:9"))
    assert "OLD (tree_size 2, signed 2026-01-02T00:00:00.000000Z) is newer than NEW" in line
    same = await audit_cli("consistency", str(old), str(old), "--url", "http://127.0.0.1:9")  # one file twice
    assert same.returncode in (0, 2) and "Traceback" not in same.stderr, same.stderr
    shrunk = write_checkpoint(tmp_path / "shrunk.json", 1, timestamp="2026-01-03T00:00:00.000000Z")
    result = await audit_cli("consistency", str(new), str(shrunk), "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "the log shrank" in result.stdout, result.stderr
