"""A success rendered before its append (for an Idempotency-Key to store) is byte for byte the one
rendered after it, whatever the body holds: only the position is filled in under the store's lock."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from backend.commands.bus import Decision
from backend.http.commands import _STAND_INS, JsonRenderer
from backend.http.replies import WalletWrite
from backend.store.events import AppendResult, StreamAppended


class Noted(BaseModel):
    note: str
    amounts: list[int]
    position: int


def at(position: int) -> AppendResult:
    return AppendResult((StreamAppended("wallet-x", (position,), 1),))


@pytest.mark.parametrize("note", ["plain", f"holds {_STAND_INS[0]}", f"holds {_STAND_INS[0]} and {_STAND_INS[1]}"])
@pytest.mark.parametrize("position", [1, 9, 10, 123_456_789, 2**62])
def test_prepared_equals_rendered(note: str, position: int) -> None:
    renderer = JsonRenderer("req-1", Noted, 201)
    decision = Decision([], {"note": note, "amounts": [position, 7]})
    assert renderer.prepare(decision)(position) == renderer.success(decision, at(position))


def test_a_body_that_does_not_fit_fails_before_the_append() -> None:
    with pytest.raises(ValueError, match=r"position|wallet_id"):
        JsonRenderer(None, WalletWrite).prepare(Decision([], {"undocumented": True}))
