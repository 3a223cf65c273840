"""The log's Merkle tree over HTTP (docs/AUDIT.md): signed checkpoints, the public key, and RFC 9162
inclusion and consistency proofs, all behind `audit:read`; signing a checkpoint on demand is `admin`.
Hashes are lowercase hex, signatures base64."""

from __future__ import annotations

from typing import Annotated, Any

from aiohttp import web
from pydantic import Field

from backend.appkeys import AUDIT_SIGNER, POOL, SETTINGS
from backend.audit import tree_store
from backend.audit.signing import public_pem, raw_public
from backend.audit.verify import head
from backend.domain.api_key import ADMIN
from backend.http import replies
from backend.http.audit_params import SCOPE, Limit, Query, query
from backend.http.endpoint import JSON, endpoint
from backend.http.integers import ASCII_DIGITS_ONLY
from backend.http.problems import Problem, invalid_parameters
from backend.store.events import MAX_POSITION

routes = web.RouteTableDef()

Hex32 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=1, le=MAX_POSITION), ASCII_DIGITS_ONLY]
MAX_CATCH_UP_BATCHES = 20
"""A request folds at most this many batches itself; far behind, it signs what the folder has reached."""
NOT_CONFIGURED = "signing_not_configured"
NOT_CONFIGURED_DETAIL = "this server signs no checkpoints: AUDIT_SIGNING_KEY_FILE is not set"


class TreeHead(replies.Reply):
    """The folded tree as it stands (unsigned: compare with a signed checkpoint)."""

    tree_size: int = Field(ge=0)
    root_hash: Hex32


class SignedCheckpoint(replies.Reply):
    """Signed: the Ed25519 signature (base64) covers the text form given in docs/AUDIT.md."""

    id: int
    tree_size: int = Field(ge=0)
    root_hash: Hex32
    timestamp: str
    key_id: Hex32
    signature: str


class CheckpointPage(replies.Page):
    """Newest first; next_cursor (an id) leads to older ones."""

    data: list[SignedCheckpoint]


class PublicKey(replies.Reply):
    algorithm: str
    key_id: Hex32
    public_key_pem: str
    public_key_hex: Hex32


class InclusionProof(replies.Reply):
    position: int
    leaf_index: int = Field(description="position - 1")
    tree_size: int
    leaf_hash: Hex32
    root_hash: Hex32
    audit_path: list[Hex32]


class ConsistencyProof(replies.Reply):
    first: int
    second: int
    first_root: Hex32
    second_root: Hex32
    audit_path: list[Hex32]


class InclusionQuery(Query):
    position: Size
    tree_size: Size | None = None


class ConsistencyQuery(Query):
    first: Size
    second: Size | None = None


class CheckpointsQuery(Query):
    cursor: Annotated[int, Field(ge=1, le=2**63 - 1, description="next_cursor of the previous page: the "
                                 "page holds checkpoints older than it (default: from the newest)"),
                      ASCII_DIGITS_ONLY] | None = None
    limit: Limit = 100


def reply(model: type[replies.Reply], body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=replies.render(model, body), content_type=JSON, status=status)


def too_small(field: str, exc: tree_store.TreeTooSmall) -> Problem:
    return invalid_parameters((field, f"{exc}: the tree reaches that size once it has folded that far"))


@routes.get("/v1/audit/tree")
@endpoint(scope=SCOPE, reply=TreeHead)
async def tree(request: web.Request) -> web.Response:
    """The size and root of the tree folded so far."""
    async with request.app[POOL].acquire() as conn:
        size = await tree_store.tree_size(conn)
        root = await tree_store.root(conn, size)
    return reply(TreeHead, {"tree_size": size, "root_hash": root.hex()})


@routes.get("/v1/audit/proofs/inclusion")
@endpoint(scope=SCOPE, reply=InclusionProof, query=InclusionQuery)
async def inclusion(request: web.Request) -> web.Response:
    """RFC 9162 audit path of the event at `position` in the tree of `tree_size` leaves (default: the
    tree folded so far); check it against a signed checkpoint of that size."""
    q = query(request, InclusionQuery)
    pool = request.app[POOL]
    size = q.tree_size if q.tree_size is not None else await tree_store.tree_size(pool)
    if q.position > size:
        raise invalid_parameters(("position", f"beyond the tree of size {size}"))
    try:
        leaf, path, root = await tree_store.inclusion(pool, q.position - 1, size)
    except tree_store.TreeTooSmall as exc:
        raise too_small("tree_size", exc) from None
    return reply(InclusionProof, {"position": q.position, "leaf_index": q.position - 1, "tree_size": size,
                                  "leaf_hash": leaf.hex(), "root_hash": root.hex(),
                                  "audit_path": [h.hex() for h in path]})


@routes.get("/v1/audit/proofs/consistency")
@endpoint(scope=SCOPE, reply=ConsistencyProof, query=ConsistencyQuery)
async def consistency(request: web.Request) -> web.Response:
    """RFC 9162 consistency proof that the tree of `second` leaves (default: the tree folded so far)
    extends the tree of `first` leaves."""
    q = query(request, ConsistencyQuery)
    pool = request.app[POOL]
    second = q.second if q.second is not None else await tree_store.tree_size(pool)
    if q.first > second:
        raise invalid_parameters(("first", f"greater than second ({second})"))
    try:
        path, first_root, second_root = await tree_store.consistency(pool, q.first, second)
    except tree_store.TreeTooSmall as exc:
        raise too_small("second", exc) from None
    return reply(ConsistencyProof, {"first": q.first, "second": second, "first_root": first_root.hex(),
                                    "second_root": second_root.hex(), "audit_path": [h.hex() for h in path]})


@routes.get("/v1/audit/checkpoints")
@endpoint(scope=SCOPE, reply=CheckpointPage, query=CheckpointsQuery)
async def checkpoints(request: web.Request) -> web.Response:
    """Stored checkpoints, newest first; kept (and served) even after the key is removed."""
    q = query(request, CheckpointsQuery)
    found = await tree_store.checkpoints(request.app[POOL], q.cursor, q.limit + 1)
    page = found[:q.limit]
    more = len(found) > q.limit
    return reply(CheckpointPage, {"data": page, "has_more": more, "next_cursor": str(page[-1]["id"]) if more else None})


@routes.get("/v1/audit/checkpoints/latest")
@endpoint(scope=SCOPE, reply=SignedCheckpoint, errors=("not_found", NOT_CONFIGURED))
async def latest_checkpoint(request: web.Request) -> web.Response:
    """The newest signed checkpoint."""
    found = await tree_store.latest(request.app[POOL])
    if found is None:
        if AUDIT_SIGNER not in request.app:
            raise Problem(404, NOT_CONFIGURED, NOT_CONFIGURED_DETAIL)
        raise Problem(404, "not_found", "no checkpoint has been signed yet")
    return reply(SignedCheckpoint, found)


@routes.post("/v1/audit/checkpoints")
@endpoint(scope=ADMIN, reply=SignedCheckpoint, status=201, errors=(NOT_CONFIGURED,))
async def sign_checkpoint(request: web.Request) -> web.Response:
    """Fold the tree up to the head as of this request (at most 20 batches of AUDIT_FOLD_BATCH events:
    beyond that, up to where the folder has reached), sign it and store the checkpoint, now."""
    signer = request.app.get(AUDIT_SIGNER)
    if signer is None:
        raise Problem(404, NOT_CONFIGURED, NOT_CONFIGURED_DETAIL)
    async with request.app[POOL].acquire() as conn:
        await tree_store.catch_up(conn, await head(conn), request.app[SETTINGS].audit_fold_batch, MAX_CATCH_UP_BATCHES)
        signed = await tree_store.sign(conn, signer)
    return reply(SignedCheckpoint, signed, status=201)


@routes.get("/v1/audit/public-key")
@endpoint(scope=SCOPE, reply=PublicKey, errors=(NOT_CONFIGURED,))
async def public_key(request: web.Request) -> web.Response:
    """The Ed25519 key checkpoints are signed with (pin it: fetch it once, over a channel you trust)."""
    signer = request.app.get(AUDIT_SIGNER)
    if signer is None:
        raise Problem(404, NOT_CONFIGURED, NOT_CONFIGURED_DETAIL)
    return reply(PublicKey, {"algorithm": "Ed25519", "key_id": signer.key_id,
                             "public_key_pem": public_pem(signer.public),
                             "public_key_hex": raw_public(signer.public).hex()})
