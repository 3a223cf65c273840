"""docs/ops/nginx.conf: `nginx -t` accepts it, and, run for real in front of a Tally app (its upstream
pointed at the test server, its paths at a temporary directory), it proxies a command and delivers a
stream's frame within 3 s of the command (before the stream's next checkpoint could flush a buffer),
passes a reconnecting stream's Last-Event-ID on, resends a failed DELETE but never a POST, and answers
its own errors (413, 502, 504, and a 404 for /metrics, which Prometheus scrapes on each worker's own
port) as problem+json while passing Tally's through untouched.
Skipped where nginx is not installed (.ci/run installs Debian's nginx-light)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ROOT, bearer, mint_token
from tests.sse_client import Message, Parser
from tests.support import Client

CONF = ROOT / "docs" / "ops" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.access(NGINX, os.X_OK),
                                reason=f"no nginx at {NGINX} (Debian package nginx-light; .ci/run installs it)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def localised(text: str, directory: Path, upstream_port: int | None, listen_port: int,
              more_upstreams: tuple[int, ...] = ()) -> str:
    """The shipped configuration with its files under directory, listening on listen_port, and (when
    given) its upstream replaced by the test server (and more_upstreams, each never marked failed)."""
    for directive in ("pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path"):
        text, count = re.subn(rf"(\b{directive}\s+)/\S+?(;|\s)", rf"\g<1>{directory}/{directive}\g<2>", text)
        assert count == 1, directive
    text, count = re.subn(r"listen 80;", f"listen 127.0.0.1:{listen_port};", text)
    assert count == 1
    if upstream_port is not None:
        text, count = re.subn(r"(?m)^\s*server 10\.0\.0\.\d+:8080[^;]*;\n", "", text)
        assert count == 2
        never_failed = " max_fails=0" if more_upstreams else ""
        servers = [f"server 127.0.0.1:{port}{never_failed};" for port in (upstream_port, *more_upstreams)]
        text = text.replace("least_conn;", "least_conn;\n        " + "\n        ".join(servers), 1)
    return text


@contextlib.contextmanager
def configured(upstream_port: int | None, more_upstreams: tuple[int, ...] = ()) -> Iterator[tuple[Path, int]]:
    directory = Path(tempfile.mkdtemp(prefix="tally-nginx-"))
    directory.chmod(0o755)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(localised(CONF.read_text(), directory, upstream_port, port, more_upstreams))
    try:
        yield conf, port
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_nginx_accepts_the_configuration() -> None:
    with configured(None) as (conf, _):
        checked = subprocess.run([NGINX, "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr


async def test_through_nginx_a_command_is_answered_and_a_stream_is_not_buffered(client: Client) -> None:
    app = client.app
    admin = bearer(await mint_token(app, "operator", ["admin"]))
    auditor = bearer(await mint_token(app, "auditor", ["audit:read"]))
    with configured(client.server.port) as (conf, port):
        async with running(conf, port):
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as session, session.get(
                    f"{base}/v1/streams/events", params={"after": "now"}, headers=auditor,
                    timeout=aiohttp.ClientTimeout(total=30)) as stream:
                assert stream.status == 200, await stream.text()
                async with session.post(f"{base}/v1/wallets", json={"owner": "ops", "currency": "USD"},
                                        headers=admin) as created:
                    assert created.status == 201, await created.text()
                    wallet_id = (await created.json())["wallet_id"]
                parser = Parser()
                # buffered by the proxy, the frame would wait for the buffer to fill or the stream's
                # next checkpoint (SSE_CHECKPOINT_S, 5 s)
                async with asyncio.timeout(3):
                    while not any(wallet_id in m.data for m in parser.feed(await stream.content.readany())):
                        pass
                position = int(parser.last_id)
            # a browser reconnecting through the proxy resumes after the last id it saw: the header reaches Tally
            async with aiohttp.ClientSession() as session, session.get(
                    f"{base}/v1/streams/events", headers={**auditor, "Last-Event-ID": str(position - 1)},
                    timeout=aiohttp.ClientTimeout(total=30)) as resumed:
                assert resumed.status == 200, await resumed.text()
                parser = Parser()
                async with asyncio.timeout(3):
                    frames: list[Message] = []
                    while not frames:
                        frames = [m for m in parser.feed(await resumed.content.readany()) if m.data]
                assert frames[0].last_id == str(position) and wallet_id in frames[0].data


@contextlib.asynccontextmanager
async def running(conf: Path, port: int) -> AsyncIterator[None]:
    """nginx in the foreground with conf, once it accepts connections on port; stopped on the way out."""
    nginx = await asyncio.create_subprocess_exec(NGINX, "-c", str(conf), "-g", "daemon off;",
                                                 stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(10):
            while True:
                assert nginx.returncode is None, await nginx.stderr.read() if nginx.stderr else b""
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                await asyncio.sleep(0.05)
        yield
    finally:
        nginx.terminate()
        await nginx.wait()


async def test_nginx_resends_a_delete_but_never_a_post_whose_connection_failed() -> None:
    """As docs/DEPLOYMENT.md says: `proxy_next_upstream error` passes a request whose host read it and
    closed the connection to the next host, except a POST (or PATCH); a DELETE, which HTTP calls
    idempotent, is sent again, and only its Idempotency-Key makes the repeat answer as the first did."""
    received: list[str] = []

    async def read_and_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append((await reader.readuntil(b"\r\n\r\n")).split(b" ", 1)[0].decode())
        writer.close()

    hosts = [await asyncio.start_server(read_and_drop, "127.0.0.1", 0) for _ in range(2)]
    first, second = (int(host.sockets[0].getsockname()[1]) for host in hosts)
    try:
        with configured(first, (second,)) as (conf, port):
            async with running(conf, port), aiohttp.ClientSession() as session:
                for method in ("POST", "DELETE"):
                    async with session.request(method, f"http://127.0.0.1:{port}/v1/api-keys/x") as reply:
                        assert reply.status == 502
    finally:
        for host in hosts:
            host.close()
    assert received == ["POST", "DELETE", "DELETE"]


async def problem_of(reply: aiohttp.ClientResponse) -> dict[str, object]:
    assert reply.content_type == "application/problem+json", await reply.text()
    body: dict[str, object] = await reply.json(content_type=None)
    assert body["status"] == reply.status
    return body


async def test_what_nginx_answers_itself_is_problem_json_and_what_tally_answers_passes_untouched() -> None:
    """A body over client_max_body_size (413), no host answering (502) or none in time (504) are
    answered by nginx itself: as problem+json with a stable code, like Tally's own errors. A host's
    own error answer, a 503 problem included, reaches the client as the host sent it."""
    own_error = b'{"code":"unavailable","status":503}'

    async def host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /slow "):
            await asyncio.sleep(30)  # longer than the test's proxy_read_timeout
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/problem+json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(own_error), own_error))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(host, "127.0.0.1", 0)
    try:
        with configured(int(server.sockets[0].getsockname()[1])) as (conf, port):
            conf.write_text(conf.read_text().replace("proxy_read_timeout 60s;", "proxy_read_timeout 1s;"))
            async with running(conf, port), aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{port}"
                async with session.get(f"{base}/v1/stats") as reply:
                    assert (reply.status, await reply.read()) == (503, own_error)
                async with session.post(f"{base}/v1/wallets", data=b"x" * (2 << 20)) as reply:
                    assert (reply.status, (await problem_of(reply))["code"]) == (413, "payload_too_large")
                async with session.get(f"{base}/slow") as reply:
                    assert (reply.status, (await problem_of(reply))["code"]) == (504, "host_timeout")
                async with session.get(f"{base}/metrics") as reply:  # scraped per worker, never through here
                    assert (reply.status, (await problem_of(reply))["code"]) == (404, "not_found")
    finally:
        server.close()
    with configured(free_port()) as (conf, port):  # nothing listens there
        async with running(conf, port), aiohttp.ClientSession() as session, \
                session.post(f"http://127.0.0.1:{port}/v1/wallets", json={}) as reply:
            body = await problem_of(reply)
            assert (reply.status, body["code"]) == (502, "no_host_answered")
            assert "Idempotency-Key" in str(body["detail"]) and reply.headers["Retry-After"] == "1"
