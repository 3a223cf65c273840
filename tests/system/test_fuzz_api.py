"""schemathesis against the served /openapi.json, over a real socket: generated requests (valid and
invalid, every documented operation but the endless SSE streams) must get documented statuses,
content types, headers and bodies that fit the published schemas, and never a 5xx: bad input is a
4xx (a read-your-writes position beyond the log's head was a 503 after a 2 s wait). Longer runs of
the same tool found NUL characters reaching PostgreSQL and times given as digit strings read as Unix
times (each has its own test now); this one is the broad net, with a fixed seed so CI replays the
same cases: single requests (coverage and fuzzing phases) and chains of them (the stateful phase)."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from backend.app import create_app
from backend.server.run import Serving, start
from tests.conftest import make_settings, mint_token

pytestmark = pytest.mark.system  # schemathesis runs as a process of its own

CHECKS = ",".join(("not_a_server_error", "status_code_conformance", "response_schema_conformance",
                   "content_type_conformance", "response_headers_conformance"))
ENDLESS = r"^/v1/streams/(events|dashboard|wallets/)"


async def test_generated_requests_get_documented_answers(database_url: str, tmp_path: Path) -> None:
    """Served as `serve` serves (backend.server's protocol: what the HTTP parser refuses is problem+json)."""
    settings = make_settings(database_url, rate_limit_per_s=0, host="127.0.0.1", port=0)
    serving = await start(create_app(settings), settings)
    try:
        await fuzz(serving, tmp_path)
    finally:
        await serving.stop(5)


async def fuzz(serving: Serving, tmp_path: Path) -> None:
    token = await mint_token(serving.runner.app, "fuzzer", ["admin", "audit:read"])
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable is not None, "schemathesis is a test dependency (setup.cfg [test])"
    process = await asyncio.create_subprocess_exec(
        executable, "run", f"http://127.0.0.1:{serving.port}/openapi.json",
        "--header", f"Authorization: Bearer {token}",
        "--checks", CHECKS, "--exclude-path-regex", ENDLESS,
        "--phases", "coverage,fuzzing,stateful", "--max-examples", "50", "--seed", "20261124",
        "--workers", "1", "--request-timeout", "10", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,  # its cache stays there
    )
    output, _ = await process.communicate()
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
