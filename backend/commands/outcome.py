"""What a command produced, as plain data: the bus's answer to its caller, and what an Idempotency-Key
keeps (encoded here, before the append) so that a repeat gets the same answer.

Neither knows how it will be shown: the HTTP edge renders the first answer and every replay from it
(backend/http/commands.py), so the two are the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from backend.domain.errors import DomainError, JSONScalar


@dataclass(frozen=True, slots=True)
class Refusal:
    """A domain rule's refusal (a DomainError's code, detail and extra) and the request it refused."""

    code: str
    detail: str
    extra: Mapping[str, JSONScalar]
    request_id: str | None = None

    @classmethod
    def of(cls, error: DomainError, request_id: str | None) -> Refusal:
        return cls(error.code, error.detail, error.extra, request_id)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision's answer and the last position its append took, or (replayed only: a first
    refusal is raised as its DomainError) the refusal an Idempotency-Key kept."""

    answer: Mapping[str, Any]
    position: int
    refusal: Refusal | None = None
    replayed: bool = False


def encode_answer(answer: Mapping[str, Any]) -> bytes:
    """A success as an Idempotency-Key keeps it; the store adds its position."""
    return b'{"answer":%b}' % orjson.dumps(answer)


def encode_refusal(refusal: Refusal) -> bytes:
    return orjson.dumps({"refused": {"code": refusal.code, "detail": refusal.detail, "extra": refusal.extra,
                                     "request_id": refusal.request_id}})


def decode(outcome: bytes, position: int) -> Outcome:
    """A kept outcome, replayed (records converted by migration 0008 decode the same way)."""
    data = orjson.loads(outcome)
    refused = data.get("refused")
    if refused is None:
        return Outcome(data["answer"], position, replayed=True)
    refusal = Refusal(refused["code"], refused["detail"], refused["extra"], refused["request_id"])
    return Outcome({}, position, refusal, replayed=True)
