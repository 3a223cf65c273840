"""Wallet rules, one test per rule or transition, plus money and error-code checks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest

from backend.domain import errors
from backend.domain.money import (
    CURRENCIES,
    MAX_AMOUNT,
    minor_unit_exponent,
    require_amount,
    require_currency,
)
from backend.domain.registry import type_name
from backend.domain.wallet import Reservation, Wallet

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def wallet(balance: int = 0, currency: str = "USD", owner: str = "alice") -> Wallet:
    w = Wallet.open(uuid4(), owner, currency, T0)
    if balance:
        w.credit(balance, "seed", T0)
    w.collect_events()
    return w


def names(w: Wallet) -> list[str]:
    return [type_name(e) for e in w.collect_events()]


# ---------------------------------------------------------------- money


@pytest.mark.parametrize("bad", [True, False, 1.0, 10.5, "10", None, 0, -1, MAX_AMOUNT + 1])
def test_require_amount_rejects(bad: object) -> None:
    with pytest.raises(errors.InvalidAmount) as info:
        require_amount(bad)
    assert info.value.code == "validation_error"
    assert info.value.field == "amount"


@pytest.mark.parametrize("good", [1, 100, MAX_AMOUNT])
def test_require_amount_accepts(good: int) -> None:
    assert require_amount(good) == good


@pytest.mark.parametrize("bad", ["usd", "US", "XXX", "ABCDEFGHIJK", "", None, 840, "USD "])
def test_require_currency_rejects(bad: object) -> None:
    with pytest.raises(errors.UnsupportedCurrency) as info:
        require_currency(bad)
    assert info.value.code == "validation_error"
    assert info.value.field == "currency"


def test_currency_table() -> None:
    for code in ("USD", "EUR", "GBP", "JPY", "CHF", "BTC", "ETH", "USDT", "USDC"):
        assert require_currency(code) == code
    assert minor_unit_exponent("JPY") == 0
    assert minor_unit_exponent("USD") == 2
    assert minor_unit_exponent("BTC") == 8
    assert all(3 <= len(c) <= 10 and c.isupper() and c.isalpha() for c in CURRENCIES)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InsufficientFunds(5, 3), "insufficient_funds"),
        (errors.CurrencyMismatch("USD", "EUR"), "currency_mismatch"),
        (errors.LockNotOpen(uuid4()), "lock_not_open"),
        (errors.ReservationNotOpen(uuid4()), "reservation_not_open"),
        (errors.ReservationExpired(uuid4(), T0), "reservation_expired"),
        (errors.AmountExceedsReserved(5, 3), "amount_exceeds_reserved"),
        (errors.InvalidTransition("no"), "invalid_transition"),
        (errors.SameWallet(uuid4()), "same_wallet"),
        (errors.InvalidAmount("no"), "validation_error"),
        (errors.UnsupportedCurrency("XXX"), "validation_error"),
        (errors.ValidationError("no", field="x"), "validation_error"),
    ],
)
def test_error_codes(error: errors.DomainError, code: str) -> None:
    assert isinstance(error, errors.DomainError)
    assert error.code == code
    assert error.detail and str(error) == error.detail
    # Extra attributes are JSON scalars, ready for a problem document.
    assert all(isinstance(v, str | int | bool | type(None)) for v in error.extra.values())


def test_insufficient_funds_attributes() -> None:
    err = errors.InsufficientFunds(requested=7, available=3)
    assert (err.requested, err.available) == (7, 3)
    assert err.extra == {"requested": 7, "available": 3}


# ---------------------------------------------------------------- open


def test_open_records_wallet_opened_with_passed_id_and_time() -> None:
    wallet_id = uuid4()
    w = Wallet.open(wallet_id, "alice", "EUR", T0)
    assert (w.id, w.owner, w.currency, w.version) == (wallet_id, "alice", "EUR", 1)
    assert (w.balance, w.locked, w.reserved, w.available) == (0, 0, 0, 0)
    [event] = w.collect_events()
    assert type_name(event) == "WalletOpened"
    assert event.timestamp == T0
    assert w.created_on == T0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"currency": "XYZ"}, "currency"),
        ({"currency": "usd"}, "currency"),
        ({"owner": ""}, "owner"),
        ({"owner": 5}, "owner"),
        ({"owner": "x" * 129}, "owner"),
        ({"now": datetime(2024, 1, 1)}, "now"),  # naive
        ({"wallet_id": "not-a-uuid"}, "wallet_id"),
    ],
)
def test_open_validates(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"wallet_id": uuid4(), "owner": "a", "currency": "USD", "now": T0}
    args.update(kwargs)
    with pytest.raises(errors.ValidationError) as info:
        Wallet.open(**args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.code == "validation_error"


def test_now_in_other_timezone_is_normalised_to_utc() -> None:
    w = wallet()
    cet = timezone(timedelta(hours=2))
    w.credit(5, "r", datetime(2024, 5, 1, 14, 0, tzinfo=cet))
    [event] = w.collect_events()
    assert event.timestamp == T0
    assert event.timestamp.utcoffset() == timedelta(0)


# ---------------------------------------------------------------- credit / debit


def test_credit_and_debit() -> None:
    w = wallet()
    w.credit(100, "top-up", at(1))
    w.debit(30, "fee", at(2))
    assert (w.balance, w.available) == (70, 70)
    events = w.collect_events()
    assert [type_name(e) for e in events] == ["WalletCredited", "WalletDebited"]
    assert [e.timestamp for e in events] == [at(1), at(2)]
    assert [e.originator_version for e in events] == [2, 3]


@pytest.mark.parametrize("bad", [True, 1.5, "5", 0, -5, MAX_AMOUNT + 1])
@pytest.mark.parametrize("command", ["credit", "debit"])
def test_credit_debit_reject_bad_amounts(command: str, bad: object) -> None:
    w = wallet(balance=100)
    with pytest.raises(errors.InvalidAmount):
        getattr(w, command)(bad, "r", T0)
    assert w.pending_events == []


def test_debit_more_than_available_is_insufficient_funds() -> None:
    w = wallet(balance=100)
    w.lock(uuid4(), 30, "hold", T0)
    with pytest.raises(errors.InsufficientFunds) as info:
        w.debit(71, "r", T0)
    assert (info.value.requested, info.value.available) == (71, 70)
    w.debit(70, "r", T0)
    assert w.available == 0


def test_credit_cannot_overflow_bigint() -> None:
    w = wallet(balance=MAX_AMOUNT - 10)
    w.credit(10, "r", T0)
    assert w.balance == MAX_AMOUNT
    with pytest.raises(errors.InvalidAmount):
        w.credit(1, "r", T0)


def test_reference_must_be_text() -> None:
    w = wallet(balance=10)
    with pytest.raises(errors.ValidationError) as info:
        w.credit(1, None, T0)  # type: ignore[arg-type]
    assert info.value.field == "reference"


# ---------------------------------------------------------------- locks


def test_lock_and_release() -> None:
    w = wallet(balance=100)
    lock_id = uuid4()
    w.lock(lock_id, 40, "order 7", T0)
    assert (w.balance, w.locked, w.available, w.locks) == (100, 40, 60, {lock_id: 40})
    w.release(lock_id, at(1))
    assert (w.balance, w.locked, w.available, w.locks) == (100, 0, 100, {})
    assert names(w) == ["FundsLocked", "LockReleased"]


def test_lock_needs_available_funds() -> None:
    w = wallet(balance=100)
    with pytest.raises(errors.InsufficientFunds):
        w.lock(uuid4(), 101, "r", T0)


def test_lock_closes_exactly_once() -> None:
    w = wallet(balance=100)
    lock_id = uuid4()
    w.lock(lock_id, 10, "r", T0)
    w.release(lock_id, T0)
    with pytest.raises(errors.LockNotOpen) as info:
        w.release(lock_id, T0)
    assert info.value.state == "released"
    assert info.value.code == "lock_not_open"
    with pytest.raises(errors.InvalidTransition):
        w.lock(lock_id, 10, "reuse", T0)  # ids are never reused


def test_release_unknown_lock() -> None:
    with pytest.raises(errors.LockNotOpen) as info:
        wallet(balance=5).release(uuid4(), T0)
    assert info.value.state == "unknown"


def test_duplicate_open_lock_id_rejected() -> None:
    w = wallet(balance=100)
    lock_id = uuid4()
    w.lock(lock_id, 10, "r", T0)
    with pytest.raises(errors.InvalidTransition):
        w.lock(lock_id, 10, "r", T0)


# ---------------------------------------------------------------- settle


def test_settle_moves_locked_amount_to_other_wallet() -> None:
    a, b = wallet(balance=100), wallet(balance=5, owner="bob")
    lock_id = uuid4()
    a.lock(lock_id, 60, "purchase", T0)
    a.collect_events()
    a.settle(lock_id, b, at(3))
    assert (a.balance, a.locked, a.available) == (40, 0, 40)
    assert (b.balance, b.available) == (65, 65)
    [sent] = a.collect_events()
    [received] = b.collect_events()
    assert type_name(sent) == "LockSettled"
    assert type_name(received) == "SettlementReceived"
    assert sent.to_wallet_id == b.id  # type: ignore[attr-defined]
    assert received.from_wallet_id == a.id  # type: ignore[attr-defined]
    assert received.lock_id == lock_id  # type: ignore[attr-defined]
    assert sent.timestamp == received.timestamp == at(3)
    with pytest.raises(errors.LockNotOpen) as info:
        a.settle(lock_id, b, at(4))
    assert info.value.state == "settled"


def test_settle_rejects_currency_mismatch() -> None:
    a, b = wallet(balance=100), wallet(currency="EUR")
    lock_id = uuid4()
    a.lock(lock_id, 10, "r", T0)
    a.collect_events()
    with pytest.raises(errors.CurrencyMismatch) as info:
        a.settle(lock_id, b, T0)
    assert (info.value.expected, info.value.actual) == ("USD", "EUR")
    assert a.pending_events == [] and b.pending_events == []
    assert a.locks == {lock_id: 10}


def test_settle_rejects_same_wallet() -> None:
    a = wallet(balance=100)
    lock_id = uuid4()
    a.lock(lock_id, 10, "r", T0)
    with pytest.raises(errors.SameWallet):
        a.settle(lock_id, a, T0)


def test_settle_unknown_lock() -> None:
    with pytest.raises(errors.LockNotOpen):
        wallet(balance=1).settle(uuid4(), wallet(), T0)


def test_settle_cannot_overflow_receiver() -> None:
    a, b = wallet(balance=100), wallet(balance=MAX_AMOUNT - 5)
    lock_id = uuid4()
    a.lock(lock_id, 10, "r", T0)
    a.collect_events()
    with pytest.raises(errors.InvalidAmount):
        a.settle(lock_id, b, T0)
    assert a.pending_events == [] and b.pending_events == []


# ---------------------------------------------------------------- reservations


def reserved(amount: int, expires: int = 60) -> tuple[Wallet, UUID]:
    """A wallet of 100 with one open reservation of `amount` due at(expires), its events taken."""
    w = wallet(balance=100)
    rid = uuid4()
    w.reserve(rid, amount, at(expires), T0)
    w.collect_events()
    return w, rid


def test_reserve_and_confirm_full() -> None:
    w = wallet(balance=100)
    rid = uuid4()
    w.reserve(rid, 40, at(60), T0)
    assert (w.reserved, w.available, w.reservations) == (40, 60, {rid: Reservation(40, at(60))})
    w.confirm(rid, at(10))
    assert (w.balance, w.reserved, w.available) == (60, 0, 60)
    events = w.collect_events()
    assert [type_name(e) for e in events] == ["CreditReserved", "ReservationConfirmed"]
    assert events[1].amount == events[1].reserved_amount == 40  # type: ignore[attr-defined]


def test_confirm_partial_returns_the_rest() -> None:
    w, rid = reserved(40)
    w.confirm(rid, at(1), amount=25)
    assert (w.balance, w.reserved, w.available) == (75, 0, 75)
    assert w.closed_reservations == {rid: "confirmed"}


def test_confirm_more_than_reserved() -> None:
    w, rid = reserved(40)
    with pytest.raises(errors.AmountExceedsReserved) as info:
        w.confirm(rid, at(1), amount=41)
    assert (info.value.requested, info.value.reserved) == (41, 40)
    with pytest.raises(errors.InvalidAmount):
        w.confirm(rid, at(1), amount=0)
    assert w.pending_events == [] and w.reserved == 40


def test_reservation_closes_exactly_once() -> None:
    w, rid = reserved(10)
    w.rollback(rid, at(1))
    assert (w.reserved, w.available) == (0, 100)
    for command in (w.confirm, w.rollback):
        with pytest.raises(errors.ReservationNotOpen) as info:
            command(rid, at(2))
        assert info.value.state == "rolled_back"
    with pytest.raises(errors.ReservationNotOpen):
        w.expire(rid, at(100))
    with pytest.raises(errors.InvalidTransition):
        w.reserve(rid, 5, at(120), at(3))


def test_unknown_reservation() -> None:
    w = wallet(balance=1)
    for command in (w.confirm, w.rollback, w.expire):
        with pytest.raises(errors.ReservationNotOpen) as info:
            command(uuid4(), T0)
        assert info.value.state == "unknown"


def test_reserve_validates() -> None:
    w = wallet(balance=100)
    with pytest.raises(errors.ValidationError) as info:
        w.reserve(uuid4(), 10, T0, T0)
    assert info.value.field == "expires_at"
    with pytest.raises(errors.ValidationError) as info:
        w.reserve(uuid4(), 10, datetime(2030, 1, 1), T0)  # naive
    assert info.value.field == "expires_at"
    with pytest.raises(errors.InsufficientFunds):
        w.reserve(uuid4(), 101, at(10), T0)
    assert w.pending_events == []


def test_expire_only_when_due() -> None:
    w, rid = reserved(10)
    with pytest.raises(errors.InvalidTransition) as info:
        w.expire(rid, at(59))
    assert info.value.code == "invalid_transition"
    w.expire(rid, at(60))  # due exactly at expires_at
    assert (w.reserved, w.available, dict(w.closed_reservations)) == (0, 100, {rid: "expired"})
    [event] = w.collect_events()
    assert type_name(event) == "ReservationExpired"
    assert event.timestamp == at(60)
    with pytest.raises(errors.ReservationNotOpen) as not_open:
        w.expire(rid, at(61))
    assert not_open.value.state == "expired"


@pytest.mark.parametrize("command", ["confirm", "rollback"])
def test_confirm_or_rollback_of_due_reservation_raises_and_records_nothing(command: str) -> None:
    w, rid = reserved(10)
    with pytest.raises(errors.ReservationExpired) as info:
        getattr(w, command)(rid, at(60))
    assert info.value.code == "reservation_expired"
    assert info.value.expires_at == at(60)
    assert w.pending_events == []
    assert w.reservations == {rid: Reservation(10, at(60))}


def test_confirm_after_recorded_expiry_says_expired() -> None:
    w, rid = reserved(10, expires=5)
    w.expire(rid, at(5))
    with pytest.raises(errors.ReservationExpired):
        w.confirm(rid, at(6))
    with pytest.raises(errors.ReservationExpired):
        w.rollback(rid, at(6))


def test_due_reservations_are_expired_before_any_command_in_id_order() -> None:
    w = wallet(balance=100)
    ids = sorted([uuid4(), uuid4(), uuid4()])
    w.reserve(ids[2], 30, at(10), T0)
    w.reserve(ids[0], 30, at(20), T0)
    w.reserve(ids[1], 30, at(90), T0)  # not due below
    w.collect_events()
    # Only 10 available as recorded, but two reservations are due at t=30.
    assert w.available == 10
    w.debit(70, "after expiry", at(30))
    events = w.collect_events()
    assert [type_name(e) for e in events] == [
        "ReservationExpired",
        "ReservationExpired",
        "WalletDebited",
    ]
    assert [e.reservation_id for e in events[:2]] == [ids[0], ids[2]]  # type: ignore[attr-defined]
    assert (w.balance, w.reserved, w.available) == (30, 30, 0)


def test_expire_sweeps_every_due_reservation() -> None:
    w = wallet(balance=100)
    first, second = uuid4(), uuid4()
    w.reserve(first, 10, at(5), T0)
    w.reserve(second, 10, at(6), T0)
    w.collect_events()
    w.expire(first, at(7))
    assert names(w) == ["ReservationExpired", "ReservationExpired"]
    assert w.reservations == {}


def test_view_counts_due_reservations_as_expired() -> None:
    w = wallet(balance=100)
    rid = uuid4()
    w.lock(uuid4(), 20, "r", T0)
    w.reserve(rid, 30, at(10), T0)
    before, after = w.view(at(9)), w.view(at(10))
    assert (before.balance, before.locked, before.reserved, before.available) == (100, 20, 30, 50)
    assert (after.balance, after.locked, after.reserved, after.available) == (100, 20, 0, 80)
    assert after.as_dict()["wallet_id"] == str(w.id)
    assert after.version == w.version
    assert w.reservation_state(rid, at(9)) == "open"
    assert w.reservation_state(rid, at(10)) == "expired"
    assert w.reservation_state(uuid4(), at(10)) is None
    assert w.reserved == 30  # querying records nothing
    assert len(w.pending_events) == 2  # FundsLocked, CreditReserved


def test_debit_cannot_use_funds_of_an_undue_reservation() -> None:
    w = wallet(balance=100)
    w.reserve(uuid4(), 60, at(10), T0)
    with pytest.raises(errors.InsufficientFunds) as info:
        w.debit(41, "r", at(9))
    assert info.value.available == 40


# ---------------------------------------------------------------- deposits


def test_credit_from_deposit_once() -> None:
    w = wallet()
    deposit_id = uuid4()
    w.credit_from_deposit(deposit_id, 500, "tx-1", T0)
    assert w.balance == 500
    [event] = w.collect_events()
    assert type_name(event) == "DepositCredited"
    assert (event.deposit_id, event.chain_tx_id) == (deposit_id, "tx-1")  # type: ignore[attr-defined]
    with pytest.raises(errors.InvalidTransition):
        w.credit_from_deposit(deposit_id, 500, "tx-1", at(1))
    with pytest.raises(errors.ValidationError) as info:
        w.credit_from_deposit(uuid4(), 5, "", at(1))
    assert info.value.field == "chain_tx_id"


# ---------------------------------------------------------------- general


def _failing_commands() -> list[tuple[str, Callable[[Wallet, Wallet, UUID, UUID], None]]]:
    return [
        ("debit", lambda w, o, lock, rid: w.debit(10_000, "r", at(100))),
        ("lock", lambda w, o, lock, rid: w.lock(uuid4(), 10_000, "r", at(100))),
        ("release", lambda w, o, lock, rid: w.release(uuid4(), at(100))),
        ("settle", lambda w, o, lock, rid: w.settle(lock, w, at(100))),
        ("reserve", lambda w, o, lock, rid: w.reserve(uuid4(), 10_000, at(200), at(100))),
        ("confirm", lambda w, o, lock, rid: w.confirm(rid, at(100))),
        ("rollback", lambda w, o, lock, rid: w.rollback(rid, at(100))),
        ("expire", lambda w, o, lock, rid: w.expire(uuid4(), at(100))),
        ("credit", lambda w, o, lock, rid: w.credit(0, "r", at(100))),
    ]


@pytest.mark.parametrize(("name", "command"), _failing_commands())
def test_failed_command_records_nothing_even_with_due_reservations(
    name: str, command: Callable[[Wallet, Wallet, UUID, UUID], None]
) -> None:
    w, other = wallet(balance=100), wallet()
    lock_id, rid = uuid4(), uuid4()
    w.lock(lock_id, 10, "r", T0)
    w.reserve(rid, 10, at(50), T0)  # due at t=100
    w.collect_events()
    version, state = w.version, dict(vars(w))
    with pytest.raises(errors.DomainError):
        command(w, other, lock_id, rid)
    assert w.pending_events == [] and other.pending_events == []
    assert w.version == version
    assert vars(w) == state, name


def test_event_methods_do_not_validate_on_replay() -> None:
    """History recorded under looser rules still replays (apply never raises on business rules)."""
    w = wallet()
    # Simulate an old debit into overdraft, which current rules would reject.
    w.trigger_event(Wallet.WalletDebited, amount=50, reference="legacy", timestamp=T0)
    assert w.balance == -50


def test_errors_module_exports_helpers() -> None:
    assert errors.require_utc(T0) == T0
    with pytest.raises(errors.ValidationError, match="years 1 and 9999"):  # no UTC equivalent
        errors.require_utc(datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-14))), "expires_at")
    with pytest.raises(errors.ValidationError):
        errors.require_count(-1, "confirmations")
    with pytest.raises(errors.ValidationError):
        errors.require_count(True, "confirmations")


@pytest.mark.parametrize("text", ["a\x00b", "caf\udce9"])
def test_text_is_utf8_without_nul(text: str) -> None:
    """PostgreSQL's text holds neither; a command line passes undecodable bytes as lone surrogates."""
    with pytest.raises(errors.ValidationError, match="UTF-8 text without NUL"):
        errors.require_text(text, "reference")
