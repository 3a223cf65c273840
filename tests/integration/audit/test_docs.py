"""The standard-library verifier printed in docs/AUDIT.md really verifies an export (and finds tampering)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson

from tests.conftest import ROOT
from tests.integration.audit.support import export_file, fill_log

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


CHECKPOINT_SECTION = "### Verify a checkpoint with no Tally code"


def test_the_worked_checkpoint_example_verifies(tmp_path: Path) -> None:
    """The example checkpoint in docs/AUDIT.md: its signature verifies with the documented key over the
    documented bytes (with OpenSSL too, where installed), and its root is the documented leaves' root."""
    import base64
    import hashlib
    import shutil

    from backend.audit.merkle import leaf_hash, node_hash
    from backend.audit.signing import Checkpoint, load_public_key

    text = (ROOT / "docs" / "AUDIT.md").read_text()
    example = re.search(r"```json\n(\{\n  \"id\".*?)```", text, re.DOTALL)
    pem = re.search(r"-----BEGIN PUBLIC KEY-----\n.*?-----END PUBLIC KEY-----\n", text, re.DOTALL)
    assert example is not None and pem is not None
    checkpoint = Checkpoint.from_dict(orjson.loads(example[1]))
    public = load_public_key(pem[0].encode())
    assert checkpoint.verify(public)
    assert hashlib.sha256(public.public_bytes_raw()).hexdigest() == checkpoint.key_id
    signed = f"tally-checkpoint-v1\n{checkpoint.tree_size}\n{checkpoint.root_hash.hex()}\n{checkpoint.timestamp}\n"
    assert checkpoint.text == signed.encode() and len(checkpoint.text) == 115

    section = text[text.index(CHECKPOINT_SECTION):]
    rows = re.findall(r"\| (\d) \| `([0-9a-f]{64})` \| `([0-9a-f]{64})` \|", section)
    leaves = []
    for position, event_hash, leaf in rows:
        assert event_hash == hashlib.sha256(f"event {position}".encode()).hexdigest()
        assert leaf_hash(int(position), bytes.fromhex(event_hash)).hex() == leaf
        leaves.append(bytes.fromhex(leaf))
    assert len(leaves) == 3 and node_hash(node_hash(leaves[0], leaves[1]), leaves[2]) == checkpoint.root_hash

    openssl = shutil.which("openssl")
    if openssl is None:
        return
    (tmp_path / "public.pem").write_text(pem[0])
    (tmp_path / "signed.txt").write_bytes(checkpoint.text)
    (tmp_path / "signature.bin").write_bytes(base64.b64decode(orjson.loads(example[1])["signature"]))
    command = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", "public.pem", "-rawin", "-in", "signed.txt",
               "-sigfile", "signature.bin"]
    ran = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0 and "Signature Verified Successfully" in ran.stdout, ran.stdout + ran.stderr
    (tmp_path / "signed.txt").write_bytes(checkpoint.text.replace(b"\n3\n", b"\n4\n"))
    ran = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert ran.returncode != 0
