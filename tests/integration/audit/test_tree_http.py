"""The Merkle tree over real HTTP: the background folder keeps it at the head, checkpoints are signed
(periodically and on demand) and verify with the served public key, every inclusion and consistency
proof verifies against a checkpoint, stored subtrees equal the RFC definition, checkpoints are
append-only, and a server without a key says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import STORE
from backend.audit.merkle import MemoryTree, leaf_hash, verify_consistency, verify_inclusion
from backend.audit.signing import Checkpoint, keygen, load_public_key
from backend.store.events import ANY, NewEvent, Write
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client, eventually


class Api:
    def __init__(self, client: Client, token: str) -> None:
        self.client = client
        self.headers = bearer(token)

    async def call(self, method: str, path: str, params: dict[str, Any] | None = None, *, status: int = 200) -> Any:
        response = await self.client.request(method, path, params=params, headers=self.headers)
        text = await response.text()
        assert response.status == status, text
        return orjson.loads(text)

    async def get(self, path: str, params: dict[str, Any] | None = None, *, status: int = 200) -> Any:
        return await self.call("GET", path, params, status=status)


async def serve(aiohttp_client: AiohttpClient, database_url: str, **overrides: object) -> Client:
    return await aiohttp_client(create_app(make_settings(database_url, **overrides)))


async def append(client: Client, streams: int, rounds: int) -> None:
    store = client.app[STORE]
    for n in range(rounds):
        await store.append([Write(f"tree-{s}", ANY, [NewEvent("AuditProbe", {"n": n, "s": s})])
                            for s in range(streams)])


async def log_leaves(database_url: str) -> list[bytes]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("select position, hash from events order by position")
    finally:
        await conn.close()
    assert [row[0] for row in rows] == list(range(1, len(rows) + 1))
    return [leaf_hash(row[0], bytes(row[1])) for row in rows]


async def folded_to(api: Api, size: int) -> dict[str, Any]:
    async def tree() -> dict[str, Any] | None:
        found: dict[str, Any] = await api.get("/v1/audit/tree")
        return found if found["tree_size"] >= size else None

    return await eventually(tree, timeout=20, interval=0.05, what=f"the tree to reach {size} leaves")


async def test_folder_checkpoints_and_proofs(own_database_url: str, aiohttp_client: AiohttpClient,
                                             tmp_path: Path) -> None:
    key_file = tmp_path / "signing.pem"
    keygen(key_file)
    client = await serve(aiohttp_client, own_database_url, audit_signing_key_file=key_file, audit_checkpoint_s=0.3)
    app = client.app
    admin = Api(client, await mint_token(app, "operator", ["admin"]))
    auditor = Api(client, await mint_token(app, "auditor", ["audit:read"]))

    key = await auditor.get("/v1/audit/public-key")
    public = load_public_key(key["public_key_pem"].encode())
    assert load_public_key(key["public_key_hex"].encode()).public_bytes_raw() == public.public_bytes_raw()
    assert key["algorithm"] == "Ed25519" and len(key["key_id"]) == 64

    await append(client, streams=5, rounds=7)
    first = await admin.call("POST", "/v1/audit/checkpoints", status=201)
    leaves = await log_leaves(own_database_url)
    assert first["tree_size"] == len(leaves) >= 37, "an on-demand checkpoint covers the log up to the request"
    tree = MemoryTree(leaves)
    assert bytes.fromhex(first["root_hash"]) == tree.root()
    assert Checkpoint.from_dict(first).verify(public)
    assert first["key_id"] == key["key_id"]

    # the periodic checkpoints of the background leader follow the log
    await append(client, streams=3, rounds=4)
    leaves = await log_leaves(own_database_url)
    tree = MemoryTree(leaves)
    await folded_to(auditor, len(leaves))

    async def checkpoint() -> dict[str, Any] | None:
        found: dict[str, Any] = await auditor.get("/v1/audit/checkpoints/latest")
        return found if found["tree_size"] >= len(leaves) else None

    latest = await eventually(checkpoint, timeout=20, interval=0.05, what="a checkpoint of the whole log")
    assert Checkpoint.from_dict(latest).verify(public) and latest["id"] > first["id"]
    assert bytes.fromhex(latest["root_hash"]) == tree.root()

    size = latest["tree_size"]
    root = bytes.fromhex(latest["root_hash"])
    for position in range(1, size + 1):
        proof = await auditor.get("/v1/audit/proofs/inclusion", {"position": position, "tree_size": size})
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        assert proof["leaf_hash"] == leaves[position - 1].hex() and proof["root_hash"] == root.hex()
        assert verify_inclusion(position - 1, size, leaves[position - 1], path, root)
    for old in range(1, size + 1):
        proof = await auditor.get("/v1/audit/proofs/consistency", {"first": old, "second": size})
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
        assert verify_consistency(old, size, tree.root(old), root, path)
        assert proof["first_root"] == tree.root(old).hex()

    default = await auditor.get("/v1/audit/proofs/inclusion", {"position": 1})
    assert default["tree_size"] == size

    page = await auditor.get("/v1/audit/checkpoints", {"limit": 1})
    assert [c["id"] for c in page["data"]] == [latest["id"]] or page["data"][0]["id"] > latest["id"]
    everything: list[int] = []
    cursor: str | None = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = await auditor.get("/v1/audit/checkpoints", params)
        everything += [c["id"] for c in page["data"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert everything == sorted(everything, reverse=True) and first["id"] in everything

    # bad requests change nothing and say which parameter
    for bad_path, bad_params, field in (
        ("/v1/audit/proofs/inclusion", {"position": size + 1, "tree_size": size}, "position"),
        ("/v1/audit/proofs/inclusion", {"position": 1, "tree_size": size + 1000}, "tree_size"),
        ("/v1/audit/proofs/inclusion", {"position": 0}, "position"),
        ("/v1/audit/proofs/consistency", {"first": 3, "second": 2}, "first"),
        ("/v1/audit/proofs/consistency", {"first": 1, "second": size + 1000}, "second"),
        ("/v1/audit/checkpoints", {"limit": 0}, "limit"),
        ("/v1/audit/checkpoints", {"cursor": 2**63}, "cursor"),
    ):
        problem = await auditor.get(bad_path, bad_params, status=400)
        assert problem["code"] == "validation_error" and problem["field"] == field, problem
    assert (await auditor.call("POST", "/v1/audit/checkpoints", status=403))["code"] == "forbidden"

    # stored checkpoints and subtrees are append-only, like events
    conn = await asyncpg.connect(own_database_url)
    try:
        for sql in ("update audit_checkpoints set tree_size = 0", "delete from merkle_nodes",
                    "truncate audit_checkpoints"):
            with pytest.raises(asyncpg.RestrictViolationError, match="immutable"):
                await conn.execute(sql)
        stored = {(r[0], r[1]): bytes(r[2]) for r in await conn.fetch("select level, index, hash from merkle_nodes")}
    finally:
        await conn.close()
    assert stored == {node: tree.subtree(node) for node in stored}
    assert len(stored) == 2 * len(leaves) - bin(len(leaves)).count("1")


async def test_without_a_key_nothing_is_signed_and_the_endpoints_say_so(
        own_database_url: str, aiohttp_client: AiohttpClient) -> None:
    client = await serve(aiohttp_client, own_database_url)
    app = client.app
    admin = Api(client, await mint_token(app, "operator", ["admin"]))
    for path in ("/v1/audit/public-key", "/v1/audit/checkpoints/latest"):
        problem = await admin.get(path, status=404)
        assert problem["code"] == "signing_not_configured" and "AUDIT_SIGNING_KEY_FILE" in problem["detail"]
    problem = await admin.call("POST", "/v1/audit/checkpoints", status=404)
    assert problem["code"] == "signing_not_configured"
    assert (await admin.get("/v1/audit/checkpoints"))["data"] == []
    await append(client, streams=2, rounds=2)
    leaves = await log_leaves(own_database_url)
    tree = await folded_to(admin, len(leaves))
    assert tree["root_hash"] == MemoryTree(leaves).root().hex(), "the tree is kept without a key"
    metrics = await (await client.get("/metrics")).text()
    gauges = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("tally_audit_")}
    assert gauges == {"tally_audit_folder_leading": 1, "tally_audit_tree_size": len(leaves),
                      "tally_audit_checkpoints_signed_total": 0}


def test_a_bad_key_file_stops_startup_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    bad = tmp_path / "not-a-key.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    bad.chmod(0o600)  # as a key file must be: what is refused here is its content
    result = subprocess.run([sys.executable, "-c", "from backend.audit.signing import Signer; import pathlib;"
                             f"Signer.from_file(pathlib.Path({str(bad)!r}))"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and "is not an unencrypted PKCS#8 PEM private key" in result.stderr
    assert "nope" not in result.stderr
