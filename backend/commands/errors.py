"""Errors of the command layer itself (the domain's own errors live in backend.domain.errors)."""

from __future__ import annotations


class CommandError(Exception):
    code = "command_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(CommandError):
    code = "not_found"


class Forbidden(CommandError):
    code = "forbidden"


class PreconditionFailed(CommandError):
    """If-Match named a version the aggregate is no longer (or not yet) at."""

    code = "precondition_failed"


def check_if_match(what: str, version: int, expected: int | None) -> None:
    """The If-Match check of every write: none asked (None), or the version it names."""
    if expected is not None and version != expected:
        raise PreconditionFailed(f"{what} is at version {version}, not {expected}")


class TooMuchContention(CommandError):
    """Optimistic appends kept losing to other writers; the command changed nothing."""

    code = "wrong_expected_version"


class IdempotencyInFlight(CommandError):
    code = "idempotency_in_flight"


class IdempotencyConflict(CommandError):
    """The Idempotency-Key was used before with a different request."""

    code = "idempotency_conflict"
