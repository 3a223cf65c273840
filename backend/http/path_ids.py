"""Ids in a request's path (`/v1/wallets/{wallet_id}`, `/v1/deposits/{deposit_id}`, ...): a UUID, else
404 not_found, as for any path that names nothing."""

from __future__ import annotations

import functools
from uuid import UUID

from aiohttp import web

from backend.http.problems import Problem


@functools.lru_cache(maxsize=16_384)
def parse_uuid(text: str) -> UUID:
    """UUID(text), memoized: the same wallet ids come back request after request, and UUID() parses in
    Python (a malformed text raises each time; exceptions are not cached)."""
    return UUID(text)


def path_uuid(request: web.Request, name: str) -> UUID:
    try:
        return parse_uuid(request.match_info[name])
    except ValueError:
        raise Problem(404, "not_found", f"{name} must be a UUID") from None
