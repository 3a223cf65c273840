"""Deposit addresses and the deposit status machine."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.domain.deposit import Deposit, derive_address
from backend.domain.errors import (
    InvalidAmount,
    InvalidTransition,
    UnsupportedCurrency,
    ValidationError,
)
from backend.domain.registry import event_from_payload, payload_from_event, replay, type_name

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SECRET = b"test-secret"

# Written out independently of deposit.TRANSITIONS, from the specification.
ALLOWED = {
    ("pending", "confirming"),
    ("pending", "failed"),
    ("pending", "expired"),
    ("confirming", "pending"),
    ("confirming", "confirmed"),
    ("confirming", "failed"),
    ("confirming", "expired"),
}
STATUSES = ("pending", "confirming", "confirmed", "failed", "expired")

Action = Callable[[Deposit, datetime], None]
ACTIONS: dict[str, Action] = {
    "confirming": lambda d, now: d.mark_confirming(2, now),
    "pending": lambda d, now: d.mark_pending(0, now),
    "confirmed": lambda d, now: d.confirm(1500, "tx-abc", 6, now),
    "failed": lambda d, now: d.fail("double spend", now),
    "expired": lambda d, now: d.expire(now),
}
# Shortest route from a new deposit to each status.
ROUTES = {
    "pending": [],
    "confirming": ["confirming"],
    "confirmed": ["confirming", "confirmed"],
    "failed": ["failed"],
    "expired": ["expired"],
}


def deposit(currency: str = "BTC") -> Deposit:
    deposit_id = uuid4()
    d = Deposit.create(deposit_id, uuid4(), currency, derive_address(deposit_id, currency, SECRET), T0)
    d.collect_events()
    return d


def in_status(status: str) -> Deposit:
    d = deposit()
    for step in ROUTES[status]:
        ACTIONS[step](d, T0)
    assert d.status == status
    d.collect_events()
    return d


# ---------------------------------------------------------------- addresses


def test_addresses_are_deterministic_and_distinct() -> None:
    deposit_id = uuid4()
    for currency in ("BTC", "ETH", "USDT", "USDC", "USD", "EUR", "JPY"):
        first = derive_address(deposit_id, currency, SECRET)
        assert first == derive_address(deposit_id, currency, SECRET)
        assert first != derive_address(uuid4(), currency, SECRET)
        assert first != derive_address(deposit_id, currency, b"another secret")


def test_address_formats() -> None:
    deposit_id = uuid4()
    assert re.fullmatch(r"tb1q[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{38}", derive_address(deposit_id, "BTC", SECRET))
    for evm in ("ETH", "USDT", "USDC"):
        assert re.fullmatch(r"0x[0-9a-f]{40}", derive_address(deposit_id, evm, SECRET))
    assert re.fullmatch(r"TLY\d{20}", derive_address(deposit_id, "USD", SECRET))


def test_address_known_vector() -> None:
    """Pins the documented derivation, so a change to it cannot go unnoticed."""
    import hashlib
    import hmac

    deposit_id = UUID("12345678-1234-5678-1234-567812345678")
    digest = hmac.new(SECRET, deposit_id.bytes, hashlib.sha256).digest()
    assert derive_address(deposit_id, "ETH", SECRET) == "0x" + digest[:20].hex()
    account = f"{int.from_bytes(digest, 'big') % 10**18:018d}"
    assert derive_address(deposit_id, "EUR", SECRET).endswith(account)


@given(st.uuids(), st.binary(min_size=1, max_size=32))
def test_fiat_account_check_digits_verify_like_an_iban(deposit_id: UUID, secret: bytes) -> None:
    address = derive_address(deposit_id, "EUR", secret)
    check, account = address[3:5], address[5:]
    # IBAN rule: move the first four characters to the end, letters to numbers, mod 97 == 1.
    assert int(account + "292134" + check) % 97 == 1


def test_address_rejects_bad_inputs() -> None:
    with pytest.raises(UnsupportedCurrency):
        derive_address(uuid4(), "XXX", SECRET)
    with pytest.raises(ValueError, match="secret"):
        derive_address(uuid4(), "BTC", b"")


# ---------------------------------------------------------------- create


def test_create() -> None:
    deposit_id, wallet_id = uuid4(), uuid4()
    d = Deposit.create(deposit_id, wallet_id, "ETH", "0xabc", T0)
    assert (d.id, d.wallet_id, d.currency, d.address) == (deposit_id, wallet_id, "ETH", "0xabc")
    assert (d.status, d.confirmations, d.amount, d.chain_tx_id) == ("pending", 0, None, None)
    [event] = d.collect_events()
    assert type_name(event) == "DepositCreated"
    assert event.timestamp == T0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"currency": "DOGE"}, "currency"),
        ({"address": ""}, "address"),
        ({"wallet_id": "w"}, "wallet_id"),
        ({"now": datetime(2024, 1, 1)}, "now"),
    ],
)
def test_create_validates(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {
        "deposit_id": uuid4(),
        "wallet_id": uuid4(),
        "currency": "BTC",
        "address": "tb1q",
        "now": T0,
    }
    args.update(kwargs)
    with pytest.raises(ValidationError) as info:
        Deposit.create(**args)  # type: ignore[arg-type]
    assert info.value.field == field


# ---------------------------------------------------------------- transitions


@pytest.mark.parametrize("source", STATUSES)
@pytest.mark.parametrize("target", STATUSES)
def test_transition_table(source: str, target: str) -> None:
    d = in_status(source)
    if (source, target) in ALLOWED:
        ACTIONS[target](d, T0 + timedelta(seconds=1))
        assert d.status == target
        assert len(d.collect_events()) == 1
    else:
        with pytest.raises(InvalidTransition) as info:
            ACTIONS[target](d, T0 + timedelta(seconds=1))
        assert info.value.code == "invalid_transition"
        assert (info.value.state, info.value.action) == (source, target)
        assert d.status == source
        assert d.pending_events == []


def test_confirm_records_amount_and_transaction() -> None:
    d = in_status("confirming")
    d.confirm(1500, "tx-abc", 6, T0 + timedelta(minutes=10))
    assert (d.status, d.amount, d.chain_tx_id, d.confirmations) == ("confirmed", 1500, "tx-abc", 6)
    [event] = d.collect_events()
    assert type_name(event) == "DepositConfirmed"
    assert event.timestamp == T0 + timedelta(minutes=10)
    with pytest.raises(InvalidTransition):
        d.confirm(1500, "tx-abc", 7, T0)  # confirmed -> confirmed: never twice


def test_confirming_and_back_to_pending_track_confirmations() -> None:
    d = deposit()
    d.mark_confirming(1, T0)
    assert (d.status, d.confirmations) == ("confirming", 1)
    d.mark_pending(0, T0)
    assert (d.status, d.confirmations) == ("pending", 0)
    assert [type_name(e) for e in d.collect_events()] == ["DepositConfirming", "DepositPending"]


def test_fail_keeps_reason() -> None:
    d = deposit()
    d.fail("address reused", T0)
    assert (d.status, d.failure_reason) == ("failed", "address reused")


@pytest.mark.parametrize("bad", [-1, True, 1.0, "3"])
def test_confirmations_must_be_a_count(bad: object) -> None:
    d = deposit()
    with pytest.raises(ValidationError) as info:
        d.mark_confirming(bad, T0)  # type: ignore[arg-type]
    assert info.value.field == "confirmations"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_confirm_validates_amount(bad: object) -> None:
    d = in_status("confirming")
    with pytest.raises(InvalidAmount):
        d.confirm(bad, "tx", 1, T0)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as info:
        d.confirm(5, "", 1, T0)
    assert info.value.field == "chain_tx_id"
    assert d.status == "confirming"


@settings(max_examples=300)
@given(st.lists(st.sampled_from(sorted(ACTIONS)), max_size=12))
def test_any_sequence_follows_the_status_machine(steps: list[str]) -> None:
    deposit_id = uuid4()
    d = Deposit.create(deposit_id, uuid4(), "USDC", derive_address(deposit_id, "USDC", SECRET), T0)
    status, confirmed = "pending", 0
    for i, target in enumerate(steps):
        now = T0 + timedelta(seconds=i)
        if (status, target) in ALLOWED:
            ACTIONS[target](d, now)
            status = target
            confirmed += target == "confirmed"
        else:
            with pytest.raises(InvalidTransition):
                ACTIONS[target](d, now)
        assert d.status == status
    assert confirmed <= 1  # the wallet is credited at most once
    assert (d.amount is not None) == (status == "confirmed")
    # Replaying the mapped history gives the same deposit.
    events = d.collect_events()
    rows = [(payload_from_event(e), e) for e in events]
    rebuilt = replay(
        event_from_payload(name, e.originator_id, e.originator_version, e.timestamp, data) for (name, data), e in rows
    )
    assert rebuilt == d
