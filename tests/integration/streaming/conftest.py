"""Fixtures for the SSE tests: app instances with their own stream settings, stream connections, and
Debian's Chromium driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import HUB
from backend.store.event_store import EventStore
from backend.store.events import ANY, NewEvent
from backend.streaming.hub import Hub
from tests.conftest import make_settings
from tests.sse_client import Stream
from tests.support import Client

MakeClient = Callable[..., Awaitable[Client]]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium; the test is skipped where the Debian package is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def make_client(aiohttp_client: AiohttpClient, database_url: str) -> MakeClient:
    """An app instance (its own pool, listener and hub) on the session database, behind a real socket."""

    async def make(**overrides: Any) -> Client:
        settings = make_settings(database_url, **{"sse_shutdown_window_s": 0.2, **overrides})
        client: Client = await aiohttp_client(create_app(settings))
        return client

    return make


async def connect(client: Client, path: str, token: str | None = None, *, headers: dict[str, str] | None = None,
                  query: Mapping[str, str | int] | None = None, **params: str | int) -> Stream:
    """GET path as an event stream; query parameters from `query` and keywords alike."""
    params = {**(query or {}), **params}
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    response = await client.get(path, params={k: str(v) for k, v in params.items()}, headers=sent)
    return Stream(response)


def hub_of(client: Client) -> Hub:
    return client.app[HUB]


async def append(store: EventStore, stream: str, *types: str, **data: Any) -> list[int]:
    """Append one event per type to stream; the positions."""
    result = await store.append_to(stream, ANY, [NewEvent(t, dict(data)) for t in types])
    return [p for s in result.streams for p in s.positions]


def new_stream(category: str = "test") -> str:
    return f"{category}-{uuid.uuid4()}"


OCCURRED = {"occurred_at": "2026-01-01T00:00:00+00:00"}  # every domain event's data carries it
WALLET_DATA: dict[str, dict[str, Any]] = {
    "WalletOpened": {"owner": "streams", "currency": "USD", **OCCURRED},
    "WalletCredited": {"amount": 100, "reference": "streams", **OCCURRED},
    "WalletDebited": {"amount": 1, "reference": "streams", **OCCURRED},
}
"""Payloads as the domain writes them, so that every read model folds these events as it folds a real
wallet's (a filter by type takes only the names the log holds: backend.domain.registry.LOGGED_TYPES)."""


def new_wallet_stream(id_prefix: str = "") -> str:
    """A wallet stream whose id starts with `wallet-` and id_prefix (hex digits, for stream_prefix filters)."""
    wallet_id = str(uuid.uuid4())
    return f"wallet-{id_prefix}{wallet_id[len(id_prefix):]}"


async def append_wallet(store: EventStore, stream: str, *types: str) -> list[int]:
    """Append one well-formed wallet event per type (WALLET_DATA) to stream; the positions."""
    result = await store.append_to(stream, ANY, [NewEvent(t, dict(WALLET_DATA[t])) for t in types])
    return [p for s in result.streams for p in s.positions]
