"""Typed keys for application state; the one place they are declared."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from backend.audit.folder import Folder
from backend.audit.signing import Signer
from backend.bootstrap import Core
from backend.clock import Clock
from backend.commands.bus import CommandBus
from backend.commands.deposits import DepositCommands
from backend.config import Settings
from backend.http.auth_failures import AuthFailures
from backend.http.authenticator import ApiKeyAuthenticator
from backend.http.heavy_reads import HeavyReads
from backend.http.metrics import Metrics
from backend.http.signed_tokens import StreamTokens
from backend.server.workers import WorkerPlace
from backend.shared_limits import SharedLimits
from backend.store.event_store import EventStore
from backend.store.listener import Listener
from backend.store.read_pools import ReadPools
from backend.store.repository import Repository
from backend.store.tail import LogTail
from backend.streaming.hub import Hub
from backend.supervisor import Supervisor
from projections.service import ProjectionService

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
"""Now, for every part of the app outside the domain (backend.clock; tests pass a ManualClock)."""
METRICS = web.AppKey("metrics", Metrics)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
"""Runs (and restarts) every background task of the process: backend.supervisor."""
WORKER = web.AppKey("worker", WorkerPlace)
"""Set in a worker of `serve --workers N` only: its place among them."""
SHARED_LIMITS = web.AppKey("shared_limits", SharedLimits)
"""Set in a worker of `serve --workers N` only: the host's per-key limits (backend/shared_limits.py)."""
DATABASE_DSN = web.AppKey("database_dsn", str)
"""DIRECT_DATABASE_URL (default DATABASE_URL): for connections that hold a session (leader locks, LISTEN)."""
POOL = web.AppKey("pool", asyncpg.Pool)
STORE = web.AppKey("store", EventStore)
LISTENER = web.AppKey("listener", Listener)
READ_POOLS = web.AppKey("read_pools", ReadPools)
"""Where reads go: a replica in use (READ_DATABASE_URL), else the primary (backend/store/read_pools.py)."""
LOG_TAIL = web.AppKey("log_tail", LogTail)
"""The process's one reader of new events (backend.store.tail), shared by its followers of the log."""
REPOSITORY = web.AppKey("repository", Repository)
COMMANDS = web.AppKey("commands", CommandBus)
DEPOSIT_COMMANDS = web.AppKey("deposit_commands", DepositCommands)
CORE = web.AppKey("core", Core)
"""The whole core (backend.bootstrap); the keys above name its parts for the handlers."""
AUTHENTICATOR = web.AppKey("authenticator", ApiKeyAuthenticator)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailures)

PROJECTIONS = web.AppKey("projections", ProjectionService)
HUB = web.AppKey("hub", Hub)
LOG_VERIFICATION = web.AppKey("log_verification", HeavyReads)
"""Turns of whole-log verifications (GET /v1/audit/verify without a stream): each keeps a connection for
as long as it reads the log, and those waiting hold none."""
STATE_REPLAY = web.AppKey("state_replay", HeavyReads)
"""Turns of wallet state replays (GET /v1/wallets/{id}/state), each reading the wallet's whole stream
on one connection; their own, so that a long verification never holds them up."""
AUDIT_SIGNER = web.AppKey("audit_signer", Signer)
"""Present only with AUDIT_SIGNING_KEY_FILE."""
AUDIT_FOLDER = web.AppKey("audit_folder", Folder)
STREAM_TOKENS = web.AppKey("stream_tokens", StreamTokens)
"""Signs and checks the tokens that open event streams from a browser (backend.http.signed_tokens)."""
OPENAPI = web.AppKey("openapi", bytes)
"""The OpenAPI document, rendered once when the app is made."""
