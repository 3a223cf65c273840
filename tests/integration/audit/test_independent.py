"""The documented bytes, checked by a second implementation that shares no code with Tally: the
canonical encoding and hash chain, the 40-byte leaves, RFC 9162 tree hashing, inclusion and
consistency proof verification (sections 2.1.3.2 and 2.1.4.2, written out again here), and the
signed checkpoint text, all against what a real server exports, proves and signs. Only hashlib,
json and the Ed25519 primitive are used."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pytest_aiohttp import AiohttpClient

from backend.appkeys import STORE
from backend.audit.signing import keygen
from backend.store.events import ANY, NewEvent, Write
from tests.conftest import mint_token
from tests.integration.audit.support import export_file, fill_log
from tests.integration.audit.test_tree_http import Api, serve

TRICKY = {"zeta": [{"b": 1, "a": None}, [], {}], "Émile": "naïve ☃ 𝄞 \"quoted\" back\\slash \x01 \x7f \u2028",
          "big": 2**63 - 1, "negative": -(2**63), "flag": True, "nested": {"y": {"β": 2, "a": 1}}}


def canonical(event: dict[str, Any]) -> bytes:
    fields = {key: event[key] for key in ("data", "recorded_at", "stream_id", "type", "version")}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def leaf(position: int, event_hash: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + position.to_bytes(8, "big") + event_hash).digest()


def node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node(mth(leaves[:k]), mth(leaves[k:]))


def inclusion_ok(index: int, size: int, leaf_hash: bytes, path: list[bytes], root: bytes) -> bool:
    """RFC 9162 2.1.3.2, step by step."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    for p in path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            r = node(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def consistency_ok(first: int, second: int, first_hash: bytes, second_hash: bytes, path: list[bytes]) -> bool:
    """RFC 9162 2.1.4.2, step by step (first < second)."""
    if not path:
        return False
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    fn, sn = first - 1, second - 1
    while fn % 2 == 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = node(c, fr), node(c, sr)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == first_hash and sr == second_hash


def signature_ok(public: Ed25519PublicKey, checkpoint: dict[str, Any]) -> bool:
    text = f"tally-checkpoint-v1\n{checkpoint['tree_size']}\n{checkpoint['root_hash']}\n{checkpoint['timestamp']}\n"
    try:
        public.verify(base64.b64decode(checkpoint["signature"]), text.encode("ascii"))
    except InvalidSignature:
        return False
    return True


def chained_leaves(export: Path) -> list[bytes]:
    """Every event's chain link recomputed, and the leaves of the tree in log order."""
    heads: dict[str, tuple[int, bytes]] = {}
    leaves = []
    for number, line in enumerate(export.read_bytes().splitlines(), start=1):
        event = json.loads(line)
        assert event["position"] == number
        version, previous = heads.get(event["stream_id"], (0, bytes(32)))
        assert event["version"] == version + 1
        stored = bytes.fromhex(event["hash"])
        assert hashlib.sha256(previous + canonical(event)).digest() == stored, event
        heads[event["stream_id"]] = (event["version"], stored)
        leaves.append(leaf(number, stored))
    return leaves


@pytest.mark.parametrize("streams", [7, 4], ids=["old-size-a-power-of-two", "old-size-not"])
async def test_a_second_implementation_agrees_with_the_server(own_database_url: str, own_pool: Any,
                                                             aiohttp_client: AiohttpClient, tmp_path: Path,
                                                             streams: int) -> None:
    key_file = tmp_path / "signing.pem"
    keygen(key_file)
    await fill_log(own_pool, streams=streams, versions=14 // streams)  # then an API key's event and one more
    client = await serve(aiohttp_client, own_database_url, audit_signing_key_file=key_file, audit_checkpoint_s=3600)
    admin = Api(client, await mint_token(client.app, "operator", ["admin"]))
    served = await admin.get("/v1/audit/public-key")
    public = load_pem_public_key(served["public_key_pem"].encode())
    assert isinstance(public, Ed25519PublicKey)
    assert hashlib.sha256(bytes.fromhex(served["public_key_hex"])).hexdigest() == served["key_id"]

    store = client.app[STORE]
    await store.append([Write("audit-é-𝄞", ANY, [NewEvent("AuditProbe", TRICKY, {"note": "ignored"})])])
    old = await admin.call("POST", "/v1/audit/checkpoints", status=201)
    await store.append([Write(f"later-{n}", ANY, [NewEvent("AuditProbe", {"n": n})]) for n in range(11)])
    new = await admin.call("POST", "/v1/audit/checkpoints", status=201)
    leaves = chained_leaves(await export_file(own_pool, tmp_path / "log.ndjson"))
    assert (old["tree_size"], new["tree_size"]) == (16, 27) if streams == 7 else (14, 25)
    assert len(leaves) == new["tree_size"]

    for checkpoint in (old, new):
        assert checkpoint["key_id"] == served["key_id"] and signature_ok(public, checkpoint)
        assert mth(leaves[:checkpoint["tree_size"]]).hex() == checkpoint["root_hash"]
        assert not signature_ok(public, {**checkpoint, "tree_size": checkpoint["tree_size"] + 1})

    size, root = new["tree_size"], bytes.fromhex(new["root_hash"])
    for position in range(1, size + 1):
        proof = await admin.get("/v1/audit/proofs/inclusion", {"position": position, "tree_size": size})
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        assert proof["leaf_hash"] == leaves[position - 1].hex()
        assert inclusion_ok(position - 1, size, leaves[position - 1], path, root), position
        assert not inclusion_ok(position - 1, size, leaves[position % size], path, root)

    proof = await admin.get("/v1/audit/proofs/consistency", {"first": old["tree_size"], "second": size})
    path = [bytes.fromhex(h) for h in proof["audit_path"]]
    old_root = bytes.fromhex(old["root_hash"])
    assert consistency_ok(old["tree_size"], size, old_root, root, path)
    assert not consistency_ok(old["tree_size"], size, leaves[0], root, path)
