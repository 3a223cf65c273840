"""Event data and client ids are checked as before, whatever shortcut the common case takes: the event
data check names the path of what it refuses, and accepts valid JSON of any mapping or string type."""

from __future__ import annotations

import re
from collections import OrderedDict
from types import MappingProxyType
from typing import Any

import pytest

from backend.http.commands import valid_idempotency_key
from backend.store.encoding import INT64_MAX, check_json
from backend.store.events import InvalidEvent


class Text(str):
    pass


@pytest.mark.parametrize("value", [
    {}, {"a": 1, "b": "x", "c": None, "d": True, "e": [1, "two", [3]], "f": {"g": {"h": -INT64_MAX - 1}}},
    {"amount": INT64_MAX, "t": ("a", 1)}, OrderedDict(a=1), MappingProxyType({"a": {"b": 2}}),
    {"a": Text("subclass")}, {Text("key"): 1}, {"a": [OrderedDict(b=[True, None])]},
])
def test_valid_data_passes(value: Any) -> None:
    check_json(value, "data")


@pytest.mark.parametrize(("value", "message"), [
    ({"a": 1.5}, "data.a: floats are not allowed"),
    ({"a": [1, {"b": 2**63}]}, r"data.a\[1\].b: integer out of 64-bit range"),
    ({"a": {"b": -2**63 - 1}}, "data.a.b: integer out of 64-bit range"),
    ({"a": ["x", "y\x00"]}, r"data.a\[1\]: strings may not contain NUL"),
    ({1: "x"}, "data: object keys must be strings"),
    ({"a": {"b": object()}}, "data.a.b: object is not a JSON value"),
    (OrderedDict(a=[Text("ok"), 0.5]), r"data.a\[1\]: floats"),
    ({"a": Text("n\x00")}, "data.a: strings may not contain NUL"),
    ({"a": {2: 1}}, "data.a: object keys must be strings"),
])
def test_invalid_data_names_its_path(value: Any, message: str) -> None:
    with pytest.raises(InvalidEvent, match=f"^{message}"):
        check_json(value, "data")


def test_idempotency_key_syntax_is_visible_ascii() -> None:
    pattern = re.compile(r"[!-~]{1,255}")
    for code in range(0x300):
        for key in (chr(code), f"k{chr(code)}y"):
            assert valid_idempotency_key(key) == bool(pattern.fullmatch(key)), repr(key)
    for key in ("", "a" * 255, "a" * 256, "\u2028", "é", "a b", "\t"):
        assert valid_idempotency_key(key) == bool(pattern.fullmatch(key)), repr(key)
