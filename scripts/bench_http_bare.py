"""The scale reference of `bench.py http`: a bare aiohttp handler that parses a small JSON body and
answers a small JSON body, nothing else (no middleware, no database). Run: `python bench_http_bare.py PORT`.
The wrk script is scripts/bench_http_bare.lua."""

from __future__ import annotations

import sys

import orjson
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    return web.Response(body=orjson.dumps({"ok": True, "amount": body.get("amount")}), content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/bare", echo)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
