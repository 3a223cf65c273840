"""Typed keys for application state; the one place they are declared."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from backend.config import Settings

SETTINGS = web.AppKey("settings", Settings)
DATABASE_DSN = web.AppKey("database_dsn", str)
POOL = web.AppKey("pool", asyncpg.Pool)
