"""API keys: creation rules, revocation, scopes and ownership."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from backend.domain.api_key import SCOPES, ApiKey, hash_secret, require_scopes, verify_secret
from backend.domain.errors import InvalidTransition, ValidationError
from backend.domain.registry import type_name

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
HASH = hash_secret("tly_secret")


def key(
    scopes: tuple[str, ...] = ("wallets:read",),
    owner: str = "alice",
    expires_at: datetime | None = None,
) -> ApiKey:
    k = ApiKey.create(uuid4(), owner, "ci", scopes, HASH, expires_at, T0)
    k.collect_events()
    return k


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert verify_secret("tly_secret", HASH)
    assert not verify_secret("tly_other", HASH)


def test_create_stores_only_the_hash() -> None:
    key_id = uuid4()
    k = ApiKey.create(key_id, "alice", "ci", ["wallets:write", "wallets:read"], HASH, None, T0)
    assert (k.id, k.owner, k.name, k.secret_hash) == (key_id, "alice", "ci", HASH)
    assert k.scopes == frozenset({"wallets:read", "wallets:write"})
    [event] = k.collect_events()
    assert type_name(event) == "ApiKeyCreated"
    assert event.timestamp == T0
    assert event.scopes == ("wallets:read", "wallets:write")  # type: ignore[attr-defined]
    assert "tly_secret" not in repr(event)


@pytest.mark.parametrize("scopes", [["wallets:delete"], ["admin", "root"], "admin", [], None, [5]])
def test_scopes_must_be_known(scopes: object) -> None:
    with pytest.raises(ValidationError) as info:
        ApiKey.create(uuid4(), "alice", "ci", scopes, HASH, None, T0)  # type: ignore[arg-type]
    assert info.value.field == "scopes"
    assert info.value.code == "validation_error"


def test_scope_table() -> None:
    assert {
        "wallets:read",
        "wallets:write",
        "deposits:write",
        "deposits:admin",
        "audit:read",
        "admin",
    } == SCOPES
    assert require_scopes(("admin", "admin")) == frozenset({"admin"})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"secret_hash": "tly_plaintext"}, "secret_hash"),
        ({"secret_hash": HASH.upper()}, "secret_hash"),
        ({"expires_at": T0}, "expires_at"),
        ({"expires_at": datetime(2030, 1, 1)}, "expires_at"),
        ({"owner": ""}, "owner"),
        ({"name": ""}, "name"),
        ({"key_id": "k"}, "key_id"),
        ({"now": datetime(2024, 1, 1)}, "now"),
    ],
)
def test_create_validates(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "key_id": uuid4(),
        "owner": "alice",
        "name": "ci",
        "scopes": ["admin"],
        "secret_hash": HASH,
        "expires_at": None,
        "now": T0,
    }
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        ApiKey.create(**args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_revoke_once() -> None:
    k = key()
    assert not k.revoked and k.revoked_at is None
    k.revoke(T0 + timedelta(hours=1))
    assert k.revoked and k.revoked_at == T0 + timedelta(hours=1)
    [event] = k.collect_events()
    assert type_name(event) == "ApiKeyRevoked"
    with pytest.raises(InvalidTransition) as info:
        k.revoke(T0 + timedelta(hours=2))
    assert info.value.code == "invalid_transition"
    assert k.pending_events == []


def test_expiry_is_kept_for_the_authenticator() -> None:
    """The key records its deadline; the authenticator judges it against the app's clock
    (tests/integration/http/test_http_keys.py, test_expired_keys_get_401)."""
    k = key(expires_at=T0 + timedelta(days=1))
    assert k.expires_at == T0 + timedelta(days=1) and not k.revoked


def test_allows_and_admin_implies_every_scope() -> None:
    reader = key(("wallets:read",))
    assert reader.allows("wallets:read")
    assert not reader.allows("wallets:write")
    assert not reader.allows("admin")
    admin = key(("admin",))
    assert all(admin.allows(scope) for scope in SCOPES)


def test_can_act_for_own_owner_unless_admin() -> None:
    alice = key(("wallets:write",), owner="alice")
    assert alice.can_act_for("alice")
    assert not alice.can_act_for("bob")
    assert key(("admin",), owner="ops").can_act_for("bob")
