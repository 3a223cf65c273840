"""Response bodies. Every JSON answer of the command and read endpoints is
validated into one of these before it is written, and /openapi.json is generated from them, so the
documented shape and the bytes on the wire cannot drift apart: a field a handler adds or drops
without changing its model fails the request (a 500 the test suite catches), not a client.

Amounts are integers of minor units, ids UUIDs, times RFC 3339 in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from backend.http.models import DepositStatusName, Scope


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Wallet(Reply):
    """A wallet's figures; available = balance - locked - reserved, never negative."""

    wallet_id: UUID
    owner: str
    currency: str
    balance: int
    available: int = Field(ge=0)
    locked: int = Field(ge=0)
    reserved: int = Field(ge=0, description="open reservations not yet past their expires_at")
    version: int = Field(ge=1, description="the wallet stream's version: send it as If-Match")


Position = Annotated[int, Field(ge=1, description="global position of the last event this command appended")]


class WalletWrite(Wallet):
    """The wallet after the command, and where its events landed."""

    position: Position


class LockWrite(WalletWrite):
    lock_id: UUID


class SettleWrite(LockWrite):
    """The paying wallet after the settlement, and the id of the one paid. The payee's figures are not
    in it: the payer's key may pay into anyone's wallet, and must not read it that way (a key of the
    payee's owner reads it with GET)."""

    to_wallet_id: UUID


class ReservationWrite(WalletWrite):
    reservation_id: UUID


class ReserveWrite(ReservationWrite):
    expires_at: AwareDatetime


class OpenLock(Reply):
    lock_id: UUID
    amount: int = Field(gt=0)
    reason: str
    locked_at: AwareDatetime


class OpenReservation(Reply):
    reservation_id: UUID
    amount: int = Field(gt=0)
    expires_at: AwareDatetime
    reserved_at: AwareDatetime


class WalletDetail(Wallet):
    """A wallet with its open locks and its open reservations not yet due."""

    locks: list[OpenLock]
    reservations: list[OpenReservation]


class Page(Reply):
    """Every list answer: `data`, `has_more` and `next_cursor` (pass it as ?cursor= for the next page),
    plus what a list adds (a log page's `head`)."""

    has_more: bool = Field(description="true when a next page may hold more: fetch it with next_cursor")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class WalletPage(Page):
    data: list[Wallet]


class Reservation(Reply):
    reservation_id: UUID
    wallet_id: UUID
    owner: str
    currency: str
    amount: int = Field(gt=0)
    status: Literal["open", "confirmed", "rolled_back", "expired"]
    confirmed_amount: int | None
    expires_at: AwareDatetime
    created_at: AwareDatetime
    closed_at: AwareDatetime | None


class Deposit(Reply):
    deposit_id: UUID
    wallet_id: UUID
    currency: str
    address: str = Field(description="derived from the deposit id with the server's secret")
    status: DepositStatusName
    confirmations: int = Field(ge=0)
    amount: int | None = Field(description="credited amount, once confirmed")
    chain_tx_id: str | None
    failure_reason: str | None
    version: int = Field(ge=1)


class DepositWrite(Deposit):
    """The deposit after the command, and its wallet (credited when the status became confirmed)."""

    position: Position
    wallet: Wallet


class ApiKey(Reply):
    """What a client may see of a key: never the secret, never its hash."""

    key_id: UUID
    owner: str
    name: str
    scopes: list[Scope]
    created_at: AwareDatetime
    expires_at: AwareDatetime | None
    revoked: bool
    revoked_at: AwareDatetime | None
    version: int = Field(ge=1)


class ApiKeyWrite(ApiKey):
    """A created key as stored for Idempotency-Key replays: without the secret."""

    position: Position


class CreatedApiKey(ApiKeyWrite):
    secret: str | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="the bearer token, in the first answer only (a replay omits it: it is never stored)",
    )


class ApiKeyPage(Page):
    data: list[ApiKey]


class CurrencyStats(Reply):
    wallets: int = 0
    credited: int = 0
    debited: int = 0
    settled: int = 0
    locked: int = 0
    reserved: int = 0
    deposits: dict[DepositStatusName, int] = Field(description="deposits by status")


class Stats(Reply):
    currencies: dict[str, CurrencyStats]
    events: dict[str, int] = Field(description="events in the log by type")


class ProjectionStatus(Reply):
    name: str
    checkpoint: int
    head: int
    lag_events: int
    lag_s: float
    state: Literal["running", "stopped", "failed"]
    leader_pid: int | None
    leader: str | None
    rebuilding: bool
    error: str | None
    failed_position: int | None
    failed_at: AwareDatetime | None
    failures: int
    updated_at: AwareDatetime | None


class Projections(Reply):
    projections: list[ProjectionStatus]



class RecordedEvent(Reply):
    """One event of the log, as the history pages and the NDJSON export carry it."""

    position: int = Field(ge=1)
    stream_id: str
    version: int = Field(ge=1)
    type: str
    data: dict[str, Any]
    metadata: dict[str, Any]
    event_id: UUID
    recorded_at: AwareDatetime
    hash: str = Field(description="hex SHA-256 chaining this event to its stream's previous one")


LogCursor = Annotated[str, Field(
    pattern="^[0-9]{1,19}$",
    description="pass as ?cursor= for the next page; never null: on the last page it is where to poll from "
                "later (the page's last position or version, or the head the page was read at)")]


class EventPage(Page):
    data: list[RecordedEvent]
    next_cursor: LogCursor
    has_more: bool = Field(description="true when more events followed the page when it was read")
    head: int = Field(description="the log's highest position when the page was read")


class StreamPage(Page):
    data: list[RecordedEvent]
    stream_id: str
    next_cursor: LogCursor
    has_more: bool = Field(description="true when more events followed the page when it was read")


class WalletState(Wallet):
    """A wallet rebuilt from its own events as of a position or a time."""

    position: int = Field(ge=0, description="the last of the wallet's events taken into account")
    as_of: AwareDatetime
    final: bool = Field(description="no event recorded up to as_of can still commit: always true for "
                                    "at_position; for as_of, true once the log holds an event recorded after it")


class ChainBreak(Reply):
    stream_id: str | None
    version: int | None
    position: int
    kind: str
    expected: str | int | None
    found: str | int | None


class VerifyReport(Reply):
    ok: bool
    source: str
    stream: str | None
    partial: bool
    streams_checked: int
    events_checked: int
    break_count: int
    breaks: list[ChainBreak]
    breaks_truncated: bool
    first_position: int | None
    last_position: int | None
    elapsed_s: float
    events_per_s: float



class Problem(BaseModel):
    """An RFC 9457 problem; further members (`field`, `errors`, the state of what refused) may follow."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="stable: switch on this, not on the title or the detail")
    request_id: str | None = None


def render(model: type[BaseModel], data: Mapping[str, Any]) -> bytes:
    """data validated into model, as JSON bytes (a mismatch raises: a server bug, never sent)."""
    return model.__pydantic_serializer__.to_json(model.model_validate(data))


class StreamToken(Reply):
    token: str = Field(description="pass as ?access_token= to open a stream; opens streams only")
    expires_at: AwareDatetime = Field(description="after this no new stream opens with it (open ones go on)")
