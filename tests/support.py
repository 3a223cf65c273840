"""Small helpers every test area shares: the typed test client of a Tally app."""

from __future__ import annotations

from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

Client = TestClient[web.Request, web.Application]
"""A client of a Tally app over a real socket; `client.app` is the app it serves."""


async def object_of(response: ClientResponse) -> dict[str, Any]:
    """The reply's JSON body, which must be an object (whatever its content type says)."""
    body = await response.json(content_type=None)
    assert isinstance(body, dict), body
    return body
