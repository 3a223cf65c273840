"""The standard-library verifier printed in docs/AUDIT.md really verifies an export (and finds tampering)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson

from tests.audit.conftest import export_file, fill_log
from tests.conftest import ROOT

SECTION = "### Or with Python's standard library alone"


def documented_verifier(tmp_path: Path) -> Path:
    text = (ROOT / "docs" / "AUDIT.md").read_text()
    block = re.search(r"```python\n(.*?)```", text[text.index(SECTION):], re.DOTALL)
    assert block is not None
    script = tmp_path / "verify_export.py"
    script.write_text(block[1])
    return script


async def run(script: Path, export: Path) -> subprocess.CompletedProcess[str]:
    """The script alone, isolated (-I): no Tally module on its path."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-I", str(script), str(export)],
                                   capture_output=True, text=True, timeout=60)


async def test_the_documented_stdlib_verifier_works(own_pool: asyncpg.Pool, tmp_path: Path) -> None:
    await fill_log(own_pool, streams=3, versions=4)
    good = await export_file(own_pool, tmp_path / "log.ndjson")
    script = documented_verifier(tmp_path)

    ran = await run(script, good)
    assert ran.returncode == 0 and "3 streams, 0 break(s)" in ran.stdout, ran.stdout + ran.stderr

    lines = good.read_bytes().splitlines(keepends=True)
    event = orjson.loads(lines[6])
    event["data"]["reference"] = "forged"
    lines[6] = orjson.dumps(event) + b"\n"
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b"".join(lines))
    ran = await run(script, bad)
    assert ran.returncode == 1
    assert f"break: stream {event['stream_id']} version {event['version']} position 7" in ran.stdout
