"""Hostile bytes against a real server process over raw sockets: what its HTTP parser rejects is
answered with problem+json (a stable code, never the offending bytes), a request head that dribbles
in is cut off with a 408, and an API key sent through any channel never reaches a log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest

from tests.support import secret_of
from tests.system.serving import Server, create_key, serving

pytestmark = pytest.mark.system

HEAD_TIMEOUT_S = 1.0
SECRET_MARK = b"s3cr3tBYTES"


@pytest.fixture(scope="module")
def server(database_url: str) -> Iterator[Server]:
    with serving(database_url, HEADER_READ_TIMEOUT_S=str(HEAD_TIMEOUT_S)) as running:
        yield running


def exchange(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Send `data`, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before taking all of it
            sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def parse(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def request(*header_lines: bytes, method: bytes = b"GET", target: bytes = b"/health/live") -> bytes:
    return b"".join([method, b" ", target, b" HTTP/1.1\r\nHost: tally\r\n", *(line + b"\r\n" for line in header_lines),
                     b"\r\n"])


MALFORMED = {
    "header over 8 KB": (request(b"X-Long: " + SECRET_MARK + b"a" * 9000), 431, "header_too_large"),
    "header name over 8 KB": (request(SECRET_MARK + b"X" * 9000 + b": 1"), 431, "header_too_large"),
    "too many headers": (request(*(b"X-N%d: %s" % (n, SECRET_MARK) for n in range(200))), 431, "too_many_headers"),
    "request line over 8 KB": (request(target=b"/v1/wallets?" + SECRET_MARK + b"&a=1" * 3000), 414, "uri_too_long"),
    "10,000 query parameters": (request(target=b"/v1/wallets?" + b"&".join(b"p%d=1" % n for n in range(10_000))),
                                414, "uri_too_long"),
    "bare LF": (b"GET /health/live HTTP/1.1\r\nHost: tally\nX-A: " + SECRET_MARK + b"\r\n\r\n", 400, "bad_request"),
    "bare CR": (request(b"X-A: " + SECRET_MARK + b"\rX-B: 1"), 400, "bad_request"),
    "NUL in a value": (request(b"X-A: " + SECRET_MARK + b"\x00b"), 400, "bad_request"),
    "control character in a value": (request(b"X-A: " + SECRET_MARK + b"\x01"), 400, "bad_request"),
    "negative Content-Length": (request(b"Content-Length: -1", b"X-A: " + SECRET_MARK, method=b"POST"),
                                400, "bad_request"),
    "Content-Length with chunked": (
        request(b"Content-Length: 5", b"Transfer-Encoding: chunked", b"X-A: " + SECRET_MARK, method=b"POST")
        + b"0\r\n\r\n", 400, "bad_request"),
    "not HTTP at all": (SECRET_MARK + b" \x16\x03\x01garbage\r\n\r\n", 400, "bad_request"),
    "an Expect other than 100-continue": (request(b"Expect: " + SECRET_MARK, b"Connection: close"),
                                          417, "expectation_failed"),
    "the same, on no route": (request(b"Expect: " + SECRET_MARK, b"Connection: close", target=b"/nowhere"),
                              417, "expectation_failed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_what_the_parser_rejects_is_problem_json_without_the_bytes(server: Server, case: str) -> None:
    data, status, code = MALFORMED[case]
    reply = exchange(server.port, data)
    got_status, headers, body = parse(reply)
    assert got_status == status, reply[:300]
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (status, code)
    assert problem["type"].endswith(code.replace("_", "-"))
    assert SECRET_MARK not in reply


def test_a_request_head_that_dribbles_in_gets_408_and_the_connection_closes(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        sent = b""
        try:
            for byte in b"Host: tally\r\nX-Slow: " + b"x" * 100:  # one byte every 0.1 s: 12 s in all
                sock.sendall(bytes([byte]))
                sent += bytes([byte])
                time.sleep(0.1)
        except OSError:
            pass  # closed by the server while still sending: what the test wants
        reply = read_until_closed(sock)
    assert len(sent) < 113, "the server let the head dribble in to the end"
    status, headers, body = parse(reply)
    assert status == 408
    assert headers["connection"] == "close"
    assert json.loads(body)["code"] == "request_timeout"


class Received(asyncio.Protocol):
    """Keeps every byte that arrives: asyncio's StreamReader raises a reset that follows an answer in
    place of the answer it has buffered, which would count a 408 the client did receive as lost."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


def test_many_slow_heads_at_once_are_all_cut_off(server: Server) -> None:
    """A slowloris client: 100 connections, each sending its head one byte every 0.25 s until answered."""

    async def dribble() -> bytes:
        transport, received = await asyncio.get_running_loop().create_connection(
            Received, "127.0.0.1", server.port)
        try:
            transport.write(b"GET /health/live HTTP/1.1\r\n")
            for byte in b"X-Slow: " + b"x" * 200:  # 50 s if never cut off
                if received.data or received.ended.done():
                    break
                transport.write(bytes([byte]))
                await asyncio.wait({received.ended}, timeout=0.25)
            await received.ended  # the answer, then the server's end of the connection
            return bytes(received.data)
        finally:
            transport.close()

    async def attack() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(dribble() for _ in range(100))), 30)

    replies = asyncio.run(attack())
    assert [parse(reply)[0] if reply else None for reply in replies] == [408] * 100


def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        status, _, _ = parse(read_until_closed(sock))
    assert status == 408


def test_an_idle_kept_alive_connection_outlives_the_head_timeout(server: Server) -> None:
    """The head timeout counts from a request's first byte; between requests the idle keep-alive
    timeout applies, as before."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request())
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.endswith(b"}"):
                reply += sock.recv(65536)
            assert parse(reply)[0] == 200
            time.sleep(HEAD_TIMEOUT_S * 2)


# ---------------------------------------------------------------- no key in any log line

def channels(token: str) -> dict[str, bytes]:
    key = token.encode()
    return {
        "Authorization header": request(b"Authorization: Bearer " + key, b"Connection: close", target=b"/v1/wallets"),
        "Authorization header over 8 KB": request(b"Authorization: Bearer " + key + b"A" * 9000),
        "Authorization header with a control character": request(b"Authorization: Bearer " + key + b"\x01"),
        "Authorization header with a NUL": request(b"Authorization: Bearer " + key + b"\x00"),
        "access_token query parameter": request(b"Connection: close", target=b"/v1/wallets?access_token=" + key),
        "URL over 8 KB with access_token": request(target=b"/v1/wallets?access_token=" + key + b"&a=1" * 3000),
        "key in the path": request(b"Connection: close", target=b"/v1/wallets/" + key),
        "key in the method": key + b" / HTTP/1.1\r\nHost: tally\r\n\r\n",
        "key in a header name": request(key + b"\x01: 1"),
    }


@pytest.mark.parametrize("parser_problems", ["true", "false"], ids=["problem+json", "aiohttp's own error pages"])
def test_a_key_sent_through_every_channel_reaches_no_log_line(database_url: str, parser_problems: str) -> None:
    """At DEBUG, and also with aiohttp's own parser-error handling (which logs the offending bytes
    with their traceback): the redaction filter is what stands between those and the log."""
    token = create_key(database_url, scopes="wallets:read", owner="leaky")
    secret = secret_of(token)
    with serving(database_url, LOG_LEVEL="DEBUG", LOG_FORMAT="json", PARSER_ERROR_PROBLEMS=parser_problems) as srv:
        for name, data in channels(token).items():
            reply = exchange(srv.port, data)
            assert reply.startswith(b"HTTP/1."), name
            if parser_problems == "true":  # aiohttp's own error page quotes the bytes it rejected
                assert secret.encode() not in reply, name
        assert srv.stop() == 0
        logs = srv.logs()
    assert "rejected" in logs or parser_problems == "false"
    assert "Error handling request" in logs or parser_problems == "true"  # aiohttp did log its line
    assert token not in logs
    assert secret not in logs
    assert secret[:12] not in logs
    assert "[redacted]" in logs
