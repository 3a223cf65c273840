"""A small Server-Sent Events client for tests: a parser that follows the WHATWG "event stream
interpretation" rules, and a reader over a real aiohttp connection.

Beyond what a browser exposes, the parser also reports id-only blocks (checkpoints: they move the last
event id but dispatch nothing), comments (heartbeats) and retry advice, so that tests can see them.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import ClientResponse


@dataclass(frozen=True)
class Message:
    kind: str
    """"event" (dispatched to listeners) or "checkpoint" (an id-only block: nothing dispatched)."""
    last_id: str
    """The stream's last event id once this block is processed (what a reconnect sends back)."""
    event: str = "message"
    data: str = ""

    def json(self) -> Any:
        return orjson.loads(self.data)


@dataclass
class Parser:
    last_id: str = ""
    retry_ms: int | None = None
    comments: list[str] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(default_factory=codecs.getincrementaldecoder("utf-8"))
    _pending: str = ""
    _started: bool = False
    _skip_lf: bool = False
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id_seen: bool = False

    def feed(self, chunk: bytes) -> list[Message]:
        text = self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        messages: list[Message] = []
        for char in text:
            if self._skip_lf:
                self._skip_lf = False
                if char == "\n":
                    continue
            if char in "\r\n":
                self._skip_lf = char == "\r"
                line, self._pending = self._pending, ""
                message = self._line(line)
                if message is not None:
                    messages.append(message)
            else:
                self._pending += char
        return messages

    def _line(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
                self._id_seen = True
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Message | None:
        data, event, id_seen = self._data, self._event, self._id_seen
        self._data, self._event, self._id_seen = [], "", False
        if not data:
            return Message("checkpoint", self.last_id) if id_seen else None
        return Message("event", self.last_id, event or "message", "\n".join(data))


class Stream:
    """Reads messages off one open SSE response."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.parser = Parser()
        self._ready: list[Message] = []
        self.ended = False
        """True once the server ended the response cleanly (EOF)."""

    @property
    def status(self) -> int:
        return self.response.status

    async def next(self, timeout: float = 10.0) -> Message:
        async with asyncio.timeout(timeout):
            while not self._ready:
                chunk = await self.response.content.readany()
                if not chunk:
                    self.ended = True
                    raise EOFError("the stream ended")
                self._ready.extend(self.parser.feed(chunk))
        return self._ready.pop(0)

    async def events(self, count: int, timeout: float = 10.0) -> list[Message]:
        """The next count dispatched events (checkpoints skipped)."""
        found: list[Message] = []
        async with asyncio.timeout(timeout):
            while len(found) < count:
                message = await self.next(timeout)
                if message.kind == "event":
                    found.append(message)
        return found

    async def until(self, predicate: Callable[[Message], bool], timeout: float = 10.0) -> list[Message]:
        """Every message up to and including the first that satisfies predicate."""
        seen: list[Message] = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.next(timeout)
                seen.append(message)
                if predicate(message):
                    return seen

    async def drain_to_end(self, timeout: float = 10.0) -> list[Message]:
        """Everything until the server ends the stream (raises on an unclean end)."""
        seen: list[Message] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    seen.append(await self.next(timeout))
        except EOFError:
            return seen

    def close(self) -> None:
        self.response.close()
