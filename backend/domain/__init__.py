"""Pure domain layer of Tally: aggregates, domain errors, money and the event registry.

No I/O: only the standard library and eventsourcing. Ids and clocks are passed in.
"""

from .api_key import SCOPES, ApiKey, hash_secret, verify_secret
from .deposit import Deposit, derive_address
from .errors import (
    AmountExceedsReserved,
    CurrencyMismatch,
    DomainError,
    InsufficientFunds,
    InvalidAmount,
    InvalidTransition,
    LockNotOpen,
    ReservationExpired,
    ReservationNotOpen,
    SameWallet,
    UnsupportedCurrency,
    ValidationError,
)
from .money import CURRENCIES, MAX_AMOUNT, require_amount, require_currency
from .registry import (
    AGGREGATE_TYPES,
    EVENT_TYPES,
    SCHEMA_VERSIONS,
    UPCASTERS,
    aggregate_for_stream,
    apikey_stream,
    deposit_stream,
    event_from_payload,
    parse_stream_id,
    payload_from_event,
    replay,
    stream_id,
    type_name,
    upcast,
    wallet_stream,
)
from .wallet import Reservation, Wallet, WalletView

__all__ = [
    "AGGREGATE_TYPES",
    "CURRENCIES",
    "EVENT_TYPES",
    "MAX_AMOUNT",
    "SCHEMA_VERSIONS",
    "SCOPES",
    "UPCASTERS",
    "AmountExceedsReserved",
    "ApiKey",
    "CurrencyMismatch",
    "Deposit",
    "DomainError",
    "InsufficientFunds",
    "InvalidAmount",
    "InvalidTransition",
    "LockNotOpen",
    "Reservation",
    "ReservationExpired",
    "ReservationNotOpen",
    "SameWallet",
    "UnsupportedCurrency",
    "ValidationError",
    "Wallet",
    "WalletView",
    "aggregate_for_stream",
    "apikey_stream",
    "deposit_stream",
    "derive_address",
    "event_from_payload",
    "hash_secret",
    "parse_stream_id",
    "payload_from_event",
    "replay",
    "require_amount",
    "require_currency",
    "stream_id",
    "type_name",
    "upcast",
    "verify_secret",
    "wallet_stream",
]
