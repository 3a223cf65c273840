"""Request bodies. Strict: integers must be JSON integers (no floats, no strings), unknown fields are errors."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
)

from backend.domain.money import CURRENCIES

MAX_AMOUNT = 2**63 - 1

Amount = Annotated[int, Field(strict=True, gt=0, le=MAX_AMOUNT,
                              description="minor units, a JSON integer (14.0 and \"14\" are refused)")]
NO_NUL = r"^[^\x00]*$"
"""PostgreSQL text cannot hold NUL: refused here as a 422 naming the field, not failed in the store."""
Text = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=NO_NUL)]
Owner = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL)]
Currency = Annotated[str, StringConstraints(min_length=3, max_length=10, pattern=NO_NUL),
                     Field(json_schema_extra={"enum": sorted(CURRENCIES)})]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class OpenWallet(Body):
    owner: Owner
    currency: Currency


class Movement(Body):
    amount: Amount
    reference: Text


class LockFunds(Body):
    amount: Amount
    reason: Text


class Settle(Body):
    to_wallet_id: Annotated[UUID, Field(strict=False)]


class Reserve(Body):
    amount: Amount
    ttl_seconds: Annotated[int, Field(strict=True, gt=0, le=30 * 86400)]


class Confirm(Body):
    amount: Amount | None = None


class Empty(Body):
    pass


class OpenDeposit(Body):
    wallet_id: Annotated[UUID, Field(strict=False)]
    currency: Currency


DepositStatusName = Literal["pending", "confirming", "confirmed", "failed", "expired"]
Count = Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]


class DepositStatusChange(Body):
    """A status report from the chain watcher. ``amount`` and ``chain_tx_id`` belong to (and are
    required by) ``confirmed`` only, ``reason`` to ``failed`` only; the errors name the field."""

    status: DepositStatusName
    confirmations: Count = 0
    amount: Annotated[Amount | None, Field(validate_default=True)] = None
    chain_tx_id: Annotated[Text | None, Field(validate_default=True)] = None
    reason: Annotated[str, StringConstraints(max_length=256, pattern=NO_NUL)] | None = None

    @field_validator("amount", "chain_tx_id")
    @classmethod
    def _only_with_confirmed(cls, value: object, info: ValidationInfo) -> object:
        status = info.data.get("status")
        if status == "confirmed" and value is None:
            raise ValueError("required when status is confirmed")
        if status is not None and status != "confirmed" and value is not None:
            raise ValueError("allowed only when status is confirmed")
        return value

    @field_validator("reason")
    @classmethod
    def _only_with_failed(cls, value: str | None, info: ValidationInfo) -> str | None:
        status = info.data.get("status")
        if status is not None and status != "failed" and value is not None:
            raise ValueError("allowed only when status is failed")
        return value


_RFC3339_START = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")
_UNSIGNED_OFFSET = re.compile(r".*:[0-9]{2}(\.[0-9]*)? [0-9]{2}:?[0-9]{2}")
"""An offset whose + became a space: what a query string makes of an unescaped +01:00."""


def _rfc3339_string(value: object) -> object:
    """Times are RFC 3339 strings. pydantic would read a number, or a string of digits such as
    "1700000000" or "0.5", as a Unix time: refuse anything that does not start like a date-time."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339_START.match(value):
        raise ValueError("must be an RFC 3339 date-time string such as 2030-01-01T00:00:00Z")
    if _UNSIGNED_OFFSET.fullmatch(value):
        raise ValueError("the offset has no sign: in a query string a + reads as a space, so send "
                         "2030-01-01T00:00:00+01:00 as 2030-01-01T00:00:00%2B01:00")
    return value


def _in_utc(value: datetime) -> datetime:
    """The time in UTC. Python's datetimes end at years 1 and 9999 in their own offset, so
    9999-12-31T23:59:59-14:00 has no UTC equivalent: refused here, not a 500 further on."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must fall between 0001-01-01 and 9999-12-31 in UTC") from None


Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_string), Field(strict=False), AfterValidator(_in_utc)]
# The scopes of backend.domain.api_key.SCOPES (a test keeps the two equal).
Scope = Literal["wallets:read", "wallets:write", "deposits:write", "deposits:admin", "audit:read", "admin"]


class CreateApiKey(Body):
    owner: Owner
    name: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NO_NUL)]
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=16)]
    expires_at: Rfc3339 | None = None
