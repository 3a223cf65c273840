"""Typed keys for application state; the one place they are declared."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from backend.config import Settings
from backend.store.event_store import EventStore
from backend.store.listener import Listener

SETTINGS = web.AppKey("settings", Settings)
DATABASE_DSN = web.AppKey("database_dsn", str)
POOL = web.AppKey("pool", asyncpg.Pool)
STORE = web.AppKey("store", EventStore)
LISTENER = web.AppKey("listener", Listener)
