"""Request bodies. Strict: integers must be JSON integers (no floats, no strings), unknown fields are errors."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_AMOUNT = 2**63 - 1

Amount = Annotated[int, Field(strict=True, gt=0, le=MAX_AMOUNT)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Owner = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Currency = Annotated[str, StringConstraints(min_length=3, max_length=10)]


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
