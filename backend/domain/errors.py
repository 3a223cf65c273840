"""Domain errors, each with a stable ``code``, plus the small input checks that raise them.

Every error carries a human ``detail`` and an ``extra`` dict of JSON-friendly attributes
(ids as strings, times as ISO 8601) that the HTTP layer can copy into a problem document.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar
from uuid import UUID

JSONScalar = str | int | bool | None


def _json(value: object) -> JSONScalar:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | bool):
        return value
    return repr(value)


class DomainError(Exception):
    """Base class: a command broke a business rule. Nothing was recorded.

    Each keyword argument is kept twice: as an attribute, as given, and in ``extra``, JSON-friendly."""

    code: ClassVar[str] = "domain_error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra: dict[str, JSONScalar] = {k: _json(v) for k, v in extra.items()}
        for name, value in extra.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r}, code={self.code!r})"


class ValidationError(DomainError):
    """An input is malformed; ``field`` names it when one field is to blame."""

    code = "validation_error"
    field: str | None

    def __init__(self, detail: str, *, field: str | None = None, **extra: object) -> None:
        super().__init__(detail, field=field, **extra)


class InvalidAmount(ValidationError):
    def __init__(self, detail: str, *, field: str = "amount") -> None:
        super().__init__(detail, field=field)


class UnsupportedCurrency(ValidationError):
    def __init__(self, currency: object, *, field: str = "currency") -> None:
        super().__init__(f"unsupported currency: {currency!r}", field=field)
        self.currency = currency


class InsufficientFunds(DomainError):
    code = "insufficient_funds"
    requested: int
    available: int

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"requested {requested} but only {available} available", requested=requested,
                         available=available)


class CurrencyMismatch(DomainError):
    code = "currency_mismatch"
    expected: str
    actual: str

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"currency {actual} does not match {expected}", expected=expected, actual=actual)


class LockNotOpen(DomainError):
    code = "lock_not_open"
    lock_id: UUID
    state: str

    def __init__(self, lock_id: UUID, state: str = "unknown") -> None:
        super().__init__(f"lock {lock_id} is not open ({state})", lock_id=lock_id, state=state)


class ReservationNotOpen(DomainError):
    code = "reservation_not_open"
    reservation_id: UUID
    state: str

    def __init__(self, reservation_id: UUID, state: str = "unknown") -> None:
        super().__init__(f"reservation {reservation_id} is not open ({state})", reservation_id=reservation_id,
                         state=state)


class ReservationExpired(DomainError):
    code = "reservation_expired"
    reservation_id: UUID
    expires_at: datetime | None

    def __init__(self, reservation_id: UUID, expires_at: datetime | None = None) -> None:
        super().__init__(f"reservation {reservation_id} has expired", reservation_id=reservation_id,
                         expires_at=expires_at)


class AmountExceedsReserved(DomainError):
    code = "amount_exceeds_reserved"
    requested: int
    reserved: int

    def __init__(self, requested: int, reserved: int) -> None:
        super().__init__(f"cannot confirm {requested}: only {reserved} reserved", requested=requested,
                         reserved=reserved)


class InvalidTransition(DomainError):
    code = "invalid_transition"
    state: str | None
    action: str | None

    def __init__(self, detail: str, *, state: str | None = None, action: str | None = None) -> None:
        super().__init__(detail, state=state, action=action)


class SameWallet(DomainError):
    code = "same_wallet"
    wallet_id: UUID

    def __init__(self, wallet_id: UUID) -> None:
        super().__init__(f"cannot settle wallet {wallet_id} into itself", wallet_id=wallet_id)


# ---------------------------------------------------------------- input checks


def require_utc(value: object, field: str = "now") -> datetime:
    """A tz-aware datetime, normalised to UTC (naive times are ambiguous, so rejected)."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValidationError(f"{field} must be a timezone-aware datetime", field=field)
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-14:00: past the last datetime once in UTC
        raise ValidationError(f"{field} must fall between years 1 and 9999 in UTC", field=field) from None


def require_uuid(value: object, field: str) -> UUID:
    if not isinstance(value, UUID):
        raise ValidationError(f"{field} must be a UUID", field=field)
    return value


def require_text(value: object, field: str, *, max_length: int = 256, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string", field=field)
    if not allow_empty and not value.strip():
        raise ValidationError(f"{field} must not be empty", field=field)
    if len(value) > max_length:
        raise ValidationError(f"{field} is longer than {max_length} characters", field=field)
    if "\x00" in value or not _is_utf8(value):  # PostgreSQL's text holds neither (a command line can pass both)
        raise ValidationError(f"{field} must be UTF-8 text without NUL", field=field)
    return value


def _is_utf8(value: str) -> bool:
    """False for lone surrogates, such as Python makes of a command line's undecodable bytes."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def require_count(value: object, field: str) -> int:
    """A non-negative int (not bool), such as a number of confirmations."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"{field} must be a non-negative integer", field=field)
    if value > 2**31 - 1:
        raise ValidationError(f"{field} is too large", field=field)
    return value


__all__: list[str] = [
    "AmountExceedsReserved",
    "CurrencyMismatch",
    "DomainError",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidTransition",
    "LockNotOpen",
    "ReservationExpired",
    "ReservationNotOpen",
    "SameWallet",
    "UnsupportedCurrency",
    "ValidationError",
    "require_count",
    "require_text",
    "require_utc",
    "require_uuid",
]
