"""Money: an ``int`` of minor units plus a currency code from a fixed table.

Amounts are bounded by ``MAX_AMOUNT`` (PostgreSQL ``bigint``), so every balance, lock and
reservation fits in a signed 64-bit column. Floats are never accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from .errors import InvalidAmount, UnsupportedCurrency

MAX_AMOUNT = 2**63 - 1

# Minor-unit exponent per currency: 1 USD = 10**2 minor units.
# ETH uses gwei (9), not wei (18): 2**63-1 wei is only about 9.2 ETH, too small a ceiling.
CURRENCIES: Mapping[str, int] = MappingProxyType(
    {
        "USD": 2,
        "EUR": 2,
        "GBP": 2,
        "JPY": 0,
        "CHF": 2,
        "CAD": 2,
        "AUD": 2,
        "SEK": 2,
        "BTC": 8,
        "ETH": 9,
        "USDT": 6,
        "USDC": 6,
    }
)

_CODE = re.compile(r"[A-Z]{3,10}")


def require_amount(value: object, field: str = "amount") -> int:
    """A positive ``int`` of minor units no larger than ``MAX_AMOUNT``; bool and float rejected."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(f"{field} must be an integer of minor units", field=field)
    if value <= 0:
        raise InvalidAmount(f"{field} must be positive", field=field)
    if value > MAX_AMOUNT:
        raise InvalidAmount(f"{field} must not exceed {MAX_AMOUNT}", field=field)
    return value


def require_currency(value: object, field: str = "currency") -> str:
    """A supported currency code (3-10 uppercase letters, listed in ``CURRENCIES``)."""
    if not isinstance(value, str) or not _CODE.fullmatch(value) or value not in CURRENCIES:
        raise UnsupportedCurrency(value, field=field)
    return value


def minor_unit_exponent(currency: str) -> int:
    return CURRENCIES[require_currency(currency)]
