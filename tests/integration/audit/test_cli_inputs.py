"""The audit CLI given inputs it cannot check (hostile files, odd server answers, bad options): one
`tally: error:` line and exit status 2, or a reported break (1); never a traceback, never a secret."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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


def write_checkpoint(path: Path, size: int, root: bytes = bytes(32)) -> Path:
    signer = Signer(Ed25519PrivateKey.generate())
    document = signer.sign(size, root, TIMESTAMP).as_dict()
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
