"""Routes added through backend.http.routing resolve exactly as aiohttp's own registration resolves them."""

from __future__ import annotations

import re

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from backend.app import ROUTE_TABLES
from backend.http.routing import SegmentCheckedResource, add_routes, segment_checked

ID = "0b7c2d6e-1f0a-4c1e-9d7b-3a2f6c8e9d10"


def apps() -> tuple[web.Application, web.Application]:
    ours, theirs = web.Application(), web.Application()
    for table in ROUTE_TABLES:
        add_routes(ours, table)
        theirs.add_routes(table)
    return ours, theirs


def paths() -> list[str]:
    """Every route's path with its placeholders filled, plus near misses: a segment more or less,
    another tail, a trailing slash, an encoded slash inside a placeholder."""
    found = set()
    for table in ROUTE_TABLES:
        for route in table:
            assert isinstance(route, web.RouteDef)
            path = re.sub(r"\{[^}]*\}", ID, route.path)
            found |= {path, path + "/", path + "/extra", path.rpartition("/")[0] or "/", path + "x",
                      re.sub(r"\{[^}]*\}", "a%2Fb", route.path)}
    return sorted(found | {"/", "/v1", "/v1/wallets//credits", "/nothing/here"})


async def outcome(app: web.Application, method: str, path: str) -> tuple[object, ...]:
    info = await app.router.resolve(make_mocked_request(method, path, app=app))
    error = info.http_exception
    if error is not None:
        return type(error), sorted(getattr(error, "allowed_methods", ()))
    return info.handler, dict(info)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE", "PUT"])
async def test_every_path_resolves_as_aiohttp_resolves_it(method: str) -> None:
    ours, theirs = apps()
    for path in paths():
        assert await outcome(ours, method, path) == await outcome(theirs, method, path), (method, path)


def test_dynamic_routes_of_plain_placeholders_are_segment_checked() -> None:
    ours, _ = apps()
    dynamic = [r for r in ours.router.resources() if "{" in r.canonical]
    assert dynamic and all(isinstance(r, SegmentCheckedResource) for r in dynamic)
    assert not segment_checked("/files/{tail:.*}") and not segment_checked("/plain")
