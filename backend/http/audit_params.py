"""What the audit endpoints (backend/http/audit.py, backend/http/audit_tree.py) share: their scope, the
types of their query parameters, and the strict parsing of a query string into a model. A module of its
own so that neither handler module imports the other.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from backend.http.bodies import field_errors
from backend.http.endpoint import refuse_unknown_parameters
from backend.http.integers import ASCII_DIGITS_ONLY
from backend.http.problems import invalid_parameters
from backend.store.events import MAX_POSITION, MAX_STREAM_ID_LENGTH

SCOPE = "audit:read"
"""Every audit query reads through the app's read pools (backend/store/read_pools.py): a read replica in
use serves it when it has replayed what the query asks about (a cursor, `to`, `at_position`; for
`as_of`, an event recorded after it), else the primary; a "does not exist" from a replica is asked
again of the primary, which may know it already."""

Position = Annotated[int, Field(ge=0, le=MAX_POSITION), ASCII_DIGITS_ONLY]
Limit = Annotated[int, Field(ge=1, le=1000), ASCII_DIGITS_ONLY]
StreamId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STREAM_ID_LENGTH)]


class Query(BaseModel):
    """Query parameters: strings converted (lax), unknown parameters rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=Query)


def query(request: web.Request, model: type[M]) -> M:
    """The query string as `model`; an empty value counts as absent, a repeated parameter is an error,
    and one the model does not take is named alone, before any missing one."""
    refuse_unknown_parameters(request, frozenset(model.model_fields))
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise invalid_parameters((name, "give this parameter once"))
        if value != "":
            values[name] = value
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise invalid_parameters(*((e["field"], e["message"]) for e in field_errors(exc))) from None
