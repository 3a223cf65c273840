"""A success checked before its append and rendered after it is byte for byte the answer a replay renders
from the outcome an Idempotency-Key keeps, whatever the body holds; a refusal kept the same way gives
back its code, detail, extra (in order) and request id."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from backend.commands.outcome import Outcome, Refusal, decode, encode_answer, encode_refusal
from backend.domain.errors import InsufficientFunds
from backend.http.commands import Answer
from backend.http.replies import WalletWrite


class Noted(BaseModel):
    note: str
    amounts: list[int]
    position: int


@pytest.mark.parametrize("note", ["plain", "holds 7314159265358979323", 'quotes " and \\ and ünïcode'])
@pytest.mark.parametrize("position", [1, 9, 10, 123_456_789, 2**62])
def test_the_first_answer_is_the_replayed_one(note: str, position: int) -> None:
    body = {"note": note, "amounts": [position, 7]}
    first = Answer(Noted)
    first.check(body)
    answered = first.render(Outcome(body, position))
    kept = decode(encode_answer(body), position)
    assert kept.replayed and kept.refusal is None
    assert Answer(Noted).render(kept) == answered
    assert answered == Noted(note=note, amounts=[position, 7], position=position).model_dump_json().encode()


def test_a_refusal_is_kept_as_plain_data() -> None:
    refusal = Refusal.of(InsufficientFunds(requested=50, available=10), "req-1")
    kept = decode(encode_refusal(refusal), 0)
    assert kept.refusal is not None and kept.refusal == refusal
    assert list(kept.refusal.extra) == ["requested", "available"]


def test_a_body_that_does_not_fit_fails_at_the_check() -> None:
    with pytest.raises(ValueError, match=r"position|wallet_id"):
        Answer(WalletWrite).check({"undocumented": True})
