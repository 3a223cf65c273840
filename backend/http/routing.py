"""Adding routes so that a request is matched against few regular expressions.

aiohttp files every route under the static prefix of its path ("/v1/wallets") and tries them in order,
each with a regex fullmatch of the whole path, which is costly (see docs/PERFORMANCE.md): a wallet GET
was matched against every pattern filed before its own. A dynamic route added here first compares the number of segments
and the literal text after its last placeholder, which rejects the other routes' paths for the cost of
a string comparison; the regex then runs only where those agree. A placeholder matches no "/", so a
path with another number of segments can never match; routes with a custom pattern
(`{name:regex}`) are added as aiohttp adds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from aiohttp import hdrs, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_PLAIN_PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")


class SegmentCheckedResource(web.DynamicResource):
    def __init__(self, path: str, *, name: str | None = None) -> None:
        super().__init__(path, name=name)
        self._slashes = path.count("/")
        self._tail = path.rpartition("}")[2]

    async def resolve(self, request: web.Request) -> tuple[UrlMappingMatchInfo | None, set[str]]:
        path = request.rel_url.path_safe
        if path.count("/") != self._slashes or not path.endswith(self._tail):
            return None, set()
        return await super().resolve(request)


def segment_checked(path: str) -> bool:
    placeholders = _PLACEHOLDER.findall(path)
    return bool(placeholders) and all(_PLAIN_PLACEHOLDER.fullmatch(p) for p in placeholders)


def add_routes(app: web.Application, routes: Iterable[web.AbstractRouteDef]) -> None:
    """app.add_routes(routes), with SegmentCheckedResource for each dynamic path of plain placeholders
    (a GET also answers HEAD, as aiohttp's add_get does unless allow_head=False)."""
    router = app.router
    for route in routes:
        if not isinstance(route, web.RouteDef) or not segment_checked(route.path):
            route.register(router)
            continue
        kwargs = dict(route.kwargs)
        name = kwargs.pop("name", None)
        allow_head = kwargs.pop("allow_head", True)
        resource = _resource(router, route.path, name)
        if route.method == hdrs.METH_GET and allow_head:
            resource.add_route(hdrs.METH_HEAD, route.handler, **kwargs)
        resource.add_route(route.method, route.handler, **kwargs)


def _resource(router: web.UrlDispatcher, path: str, name: str | None) -> SegmentCheckedResource:
    """The resource already added for this path and name (several methods share it), else a new one."""
    for resource in router.resources():
        if isinstance(resource, SegmentCheckedResource) and resource.canonical == path and resource.name == name:
            return resource
    resource = SegmentCheckedResource(path, name=name)
    router.register_resource(resource)
    return resource
