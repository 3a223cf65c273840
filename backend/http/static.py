"""The operations dashboard (GET /dashboard) and the interactive API docs (GET /docs): static files
shipped inside the package (backend/http/assets/), served without authentication, like /health.

Each file has a route of its own, made from the fixed lists below, so a request can only ever name one
of these files: there is no path to resolve, hence nothing to traverse. Every answer carries a strict
Content-Security-Policy (scripts and styles only from this origin, no inline script), so a page that
holds a pasted API key runs nothing but its own code and talks to nothing but this server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from backend.http.endpoint import Header, endpoint

STATIC = Path(__file__).parent / "assets"

CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Swagger UI sets styles through the DOM (allowed) and draws icons from data: URIs (img-src)."""

# (route, file under STATIC, operation name, summary)
FILES = (
    ("/dashboard", "dashboard/index.html", "dashboard",
     "The operations dashboard: paste an API key, watch totals, rates, events, projections and a wallet."),
    ("/dashboard/app.js", "dashboard/app.js", "dashboard_script", "The dashboard's script."),
    ("/dashboard/app.css", "dashboard/app.css", "dashboard_style", "The dashboard's style sheet."),
    ("/docs", "docs/index.html", "docs", "Interactive API docs (Swagger UI) of /openapi.json."),
    ("/docs/docs.js", "docs/docs.js", "docs_script", "Starts Swagger UI on /openapi.json."),
    ("/docs/swagger-ui-bundle.js", "docs/swagger-ui/swagger-ui-bundle.js", "docs_swagger_ui",
     "Swagger UI (swagger-ui-dist, vendored)."),
    ("/docs/swagger-ui.css", "docs/swagger-ui/swagger-ui.css", "docs_swagger_ui_style",
     "Swagger UI's style sheet (swagger-ui-dist, vendored)."),
)

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

DECLARED = (
    *(Header(name, f"always `{value}`") for name, value in HEADERS.items()),
    Header("ETag", "the file's version (aiohttp's file response; If-None-Match then answers 304)"),
)
"""What /openapi.json says these answers carry."""

routes = web.RouteTableDef()


def content_type(name: str) -> str:
    return CONTENT_TYPES[Path(name).suffix]


def _file_handler(relative: str, name: str, summary: str) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    path = STATIC / relative
    headers = {**HEADERS, "Content-Type": f"{content_type(relative)}; charset=utf-8"}

    async def handler(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers=headers)

    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = summary
    return handler


for _route, _relative, _name, _summary in FILES:
    routes.get(_route)(endpoint(public=True, content_type=content_type(_relative), headers=DECLARED)(
        _file_handler(_relative, _name, _summary)))
