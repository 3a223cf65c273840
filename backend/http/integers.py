"""Integers a client sends in a query parameter or a header: ASCII digits, nothing else.

`str.isdigit()` and `int()` each accept more than a client should send, and not the same things:
'²' passes isdigit and fails int (a 500 where a 400 was meant); other scripts' digits (U+FF11
fullwidth one, U+0661 Arabic-Indic one), '+1', '1_000' and ' 1' pass int. Every numeric query
parameter and header goes through parse_int (or, in a pydantic query model, ASCII_DIGITS_ONLY): 1 to 19 ASCII
digits, no sign, no space, no separator, within the field's bounds, else 400 validation_error naming
the field. Header values arrive without the optional whitespace around them (RFC 9110 section 5.5:
it is not part of the value).
"""

from __future__ import annotations

import re

from pydantic import BeforeValidator

from backend.http.problems import invalid_parameters

MAX_DIGITS = 19
"""Enough for any 64-bit position; int() of a longer text would be wasted work."""
_DIGITS = re.compile(f"[0-9]{{1,{MAX_DIGITS}}}")  # a character range, so ASCII only (unlike \\d)


def ascii_digits(raw: str) -> int | None:
    """raw as an int if it is 1 to MAX_DIGITS ASCII digits, else None."""
    return int(raw) if _DIGITS.fullmatch(raw) else None


def parse_int(raw: str, field: str, *, maximum: int, minimum: int = 0, message: str | None = None) -> int:
    """raw as an int in [minimum, maximum]; 400 validation_error naming field otherwise."""
    value = ascii_digits(raw)
    if value is None or not minimum <= value <= maximum:
        raise invalid_parameters((field, message or f"must be an integer from {minimum} to {maximum} "
                                                    "(ASCII digits only)"))
    return value


def _ascii_only(value: object) -> object:
    if isinstance(value, str) and _DIGITS.fullmatch(value) is None:
        raise ValueError("must be a non-negative integer of ASCII digits (no sign, space or separator)")
    return value


ASCII_DIGITS_ONLY = BeforeValidator(_ascii_only)
"""Makes an int field of a query model refuse what parse_int refuses: `Annotated[int, Field(ge=.., le=..),
ASCII_DIGITS_ONLY]`. It goes after the Field: a BeforeValidator wraps the annotations before it, and
bounds given after it reach the OpenAPI document as pydantic's `ge`/`le`, which no client reads."""
