"""Settings from the environment. Constructing Settings reads the environment; importing this does not."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NoReturn
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backend.dsn_shape import dsn_problem


class ConfigError(Exception):
    """A setting has a bad value; the message names the environment variable."""


class Settings(BaseSettings):
    # allow_inf_nan=False: CONNECT_TIMEOUT_S=inf (or 1e400) would wait for ever on a server that never answers.
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", allow_inf_nan=False)

    # production refuses settings that are only safe on a developer's machine (check_environment).
    environment: Literal["development", "production"] = "development"
    database_url: SecretStr | None = None
    data_dir: Path = Path(".data")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # `serve` with WORKERS > 1: a supervisor (backend/server/workers.py) runs that many server processes
    # on one port (SO_REUSEPORT).
    workers: int = Field(default=1, ge=1, le=64)
    # `serve` also answers /metrics and /health/* on METRICS_PORT + its worker index (0 with one
    # process): behind the one SO_REUSEPORT port a scrape reaches whichever worker the kernel picks.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    pool_min_size: int = Field(default=2, ge=0, le=200)
    pool_max_size: int = Field(default=10, ge=1, le=200)
    statement_timeout_ms: int = Field(default=5000, ge=0, le=2_147_483_647)  # PostgreSQL's limit
    command_timeout_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    wait_for_db_s: float = Field(default=0.0, ge=0)
    ready_timeout_s: float = Field(default=1.0, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    # backend.server: on SIGTERM drain without dropping a request (GRACEFUL_DRAIN; off: aiohttp's own
    # shutdown); during the drain a connection idle for DRAIN_IDLE_CLOSE_S is closed. A connection
    # must complete its request head within HEADER_READ_TIMEOUT_S (0: no limit) or gets a 408 and is
    # closed; a request's body must arrive within BODY_READ_TIMEOUT_S of its handler asking for it (0:
    # no limit), else 408 and closed. PARSER_ERROR_PROBLEMS answers malformed requests with
    # problem+json (off: aiohttp's text).
    graceful_drain: bool = True
    drain_idle_close_s: float = Field(default=1.0, ge=0)
    header_read_timeout_s: float = Field(default=5.0, ge=0)
    body_read_timeout_s: float = Field(default=10.0, ge=0)
    parser_error_problems: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # auto: text when stderr is a terminal, else JSON (always JSON in production).
    log_format: Literal["auto", "json", "text"] = "auto"
    # backend.event_loop: uvloop when installed (auto), required (uvloop), or the standard loop (asyncio).
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    apply_migrations: bool = True
    append_batch_max_events: int = Field(default=2000, ge=1, le=100_000)
    listener_poll_s: float = Field(default=0.5, gt=0)
    snapshot_every: int = Field(default=100, ge=2)
    idempotency_retention_h: float = Field(default=48, ge=24)
    housekeeping_interval_s: float = Field(default=3600, gt=0)
    # Per-API-key token bucket (backend.http.ratelimit): RATE_LIMIT_PER_S requests/s after a burst
    # of RATE_LIMIT_BURST. Either one set to 0 disables rate limiting.
    rate_limit_per_s: float = Field(default=200.0, ge=0)
    rate_limit_burst: int = Field(default=400, ge=0)
    # Failed authentications (backend.http.auth_failures), per client address: AUTH_FAILURE_RATE_PER_S
    # after a burst of AUTH_FAILURE_BURST (either one 0: no limit); beyond that a request whose key this
    # process has not cached is 429 rate_limited with Retry-After, without a lookup. At most
    # AUTH_FAILURE_MAX_ADDRESSES addresses are tracked (IPv6 ones by /64). The client address is the
    # peer's, or, when the peer is one of TRUSTED_PROXIES (comma-separated addresses or CIDRs, e.g.
    # "127.0.0.1,10.0.0.0/8"), the rightmost X-Forwarded-For address that is not. An unknown key id is
    # remembered for AUTH_NEGATIVE_TTL_S (a key created by another process works after that at most).
    # A 429 is held back AUTH_FAILURE_HOLD_S (0: answered at once) while fewer than AUTH_FAILURE_MAX_HELD are.
    auth_failure_rate_per_s: float = Field(default=20.0, ge=0)
    auth_failure_burst: int = Field(default=100, ge=0)
    auth_failure_max_addresses: int = Field(default=100_000, ge=1)
    trusted_proxies: str = ""
    auth_negative_ttl_s: float = Field(default=2.0, ge=0, le=60)
    auth_failure_hold_s: float = Field(default=1.0, ge=0, le=10)
    auth_failure_max_held: int = Field(default=1000, ge=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)  # a ValueError names the bad entry
        return value

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(part.strip(), strict=False)
                     for part in self.trusted_proxies.split(",") if part.strip())

    # HMAC key of deposit addresses (backend.domain.deposit.derive_address). The default is for
    # development and tests only: production MUST set DEPOSIT_ADDRESS_SECRET to a random value of
    # at least 32 bytes and keep it. Changing it changes the addresses of deposits opened afterwards;
    # existing deposits keep the address recorded in their DepositCreated event.
    deposit_address_secret: SecretStr = Field(default=SecretStr("tally-dev-only-deposit-address-secret"),
                                              min_length=16)
    # Projections (projections/): run them inside `serve` (else run `python -m projections`).
    run_projections: bool = True
    # `python -m projections` serves /metrics and /health/* on this port (0: it serves nothing).
    projections_metrics_port: int = Field(default=0, ge=0, le=65535)
    projection_batch_size: int = Field(default=1000, ge=1, le=100_000)
    projection_poll_s: float = Field(default=1.0, gt=0)
    projection_standby_retry_s: float = Field(default=1.0, gt=0)
    projection_max_backoff_s: float = Field(default=30.0, gt=0)
    # A runner whose new events are all of types it ignores moves its checkpoint in memory, and writes
    # it to projection_checkpoints at most this often (readers in other processes lag by up to this).
    projection_idle_checkpoint_s: float = Field(default=0.2, ge=0, le=5)
    # A runner that keeps up lets this much time pass after a batch it applied before the next: under
    # load its batches grow and its transactions become fewer; a read-your-writes read may wait up to
    # this much longer (0: no pacing).
    projection_apply_interval_s: float = Field(default=0.02, ge=0, le=1)
    expiry_batch_size: int = Field(default=100, ge=1, le=10_000)
    # Read-your-writes: how long a GET with min_position waits by default, and at most (Prefer: wait=N).
    read_wait_default_s: float = Field(default=2.0, ge=0)
    read_wait_max_s: float = Field(default=10.0, ge=0)

    @field_validator("log_level", "log_format", "event_loop", "environment", mode="before")
    @classmethod
    def _normalise_case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        levels = {"debug", "info", "warning", "error", "critical"}
        return value.upper() if value.lower() in levels else value.lower()

    @field_validator("pool_max_size")
    @classmethod
    def _max_at_least_min(cls, value: int, info: object) -> int:
        """At least 2: the append batcher keeps one pooled connection from the first command on, and a
        command's reads need another; with one, every command after the first waited for ever."""
        data = getattr(info, "data", {})
        if value < 2:
            raise ValueError("must be at least 2: the append batcher keeps one connection of the pool for itself")
        if value < data.get("pool_min_size", 0):
            raise ValueError("must be >= POOL_MIN_SIZE")
        return value

    @field_validator("metrics_port")
    @classmethod
    def _a_port_for_every_worker(cls, value: int, info: ValidationInfo) -> int:
        if value and value + info.data.get("workers", 1) - 1 > 65535:
            raise ValueError("METRICS_PORT + WORKERS - 1 must be at most 65535")
        return value

    def dsn(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    @field_validator("database_url", "direct_database_url", "read_database_url")
    @classmethod
    def _shaped_like_a_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        """A malformed URL is refused here, naming the rule and never the value (backend/dsn_shape.py)."""
        for dsn in split_dsns(value.get_secret_value() if value else ""):
            problem = dsn_problem(dsn)
            if problem is not None:
                raise ValueError(problem)
        return value

    # PgBouncer (docs/DEPLOYMENT.md): with DATABASE_POOL_MODE=transaction the pools on DATABASE_URL go
    # without asyncpg's prepared-statement cache and without session settings at connect, so that a
    # pooler in transaction mode may sit in front; what needs a session of its own (LISTEN, the leaders'
    # session advisory locks, migrations and rebuilds, audit's and db roles' connections) connects to
    # DIRECT_DATABASE_URL instead (default: DATABASE_URL itself).
    direct_database_url: SecretStr | None = None
    database_pool_mode: Literal["session", "transaction"] = "session"

    @field_validator("direct_database_url")
    @classmethod
    def _direct_needs_database(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # unset or empty: DATABASE_URL's
        if info.data.get("database_url") is None:
            raise ValueError("needs DATABASE_URL (without it Tally uses its embedded server)")
        return value

    @field_validator("database_pool_mode")
    @classmethod
    def _transaction_mode_needs_direct(cls, value: str, info: ValidationInfo) -> str:
        if value == "transaction" and info.data.get("direct_database_url") is None:
            raise ValueError("transaction needs DIRECT_DATABASE_URL: LISTEN, the leaders' locks and the "
                             "migration lock hold sessions, which a pooler in transaction mode does not keep")
        return value

    def direct_dsn(self, dsn: str) -> str:
        """Where session-scoped connections go: DIRECT_DATABASE_URL, else `dsn` (DATABASE_URL or embedded)."""
        return self.direct_database_url.get_secret_value() if self.direct_database_url else dsn
    def read_dsns(self) -> list[str]:
        """READ_DATABASE_URL as a list of DSNs."""
        return split_dsns(self.read_database_url.get_secret_value() if self.read_database_url else "")

    def log_format_choice(self) -> str:
        """LOG_FORMAT as configure_logging takes it: `auto` stays auto, except in production (JSON)."""
        if self.log_format == "auto" and self.environment == "production":
            return "json"
        return self.log_format

    # Server-Sent Events (backend.streaming): a heartbeat comment every SSE_HEARTBEAT_S keeps proxies
    # from closing idle streams; SSE_RETRY_MS is the reconnection delay advised to browsers; a send that
    # cannot complete within SSE_SEND_TIMEOUT_S closes its stream; a filtered stream gets an id-only
    # checkpoint frame at most every SSE_CHECKPOINT_S; SSE_MAX_STREAMS_PER_KEY (429) and SSE_MAX_STREAMS
    # (per process, 503); dashboards get at most one stats frame per SSE_DASHBOARD_INTERVAL_S; on
    # shutdown streams close spread over SSE_SHUTDOWN_WINDOW_S (no reconnect storm); the last
    # SSE_WINDOW_EVENTS events are kept in memory for live streams (behind them, streams page the
    # store SSE_PAGE_SIZE events at a time).
    sse_heartbeat_s: float = Field(default=15.0, gt=0)
    sse_retry_ms: int = Field(default=3000, ge=0)
    sse_send_timeout_s: float = Field(default=10.0, gt=0)
    sse_socket_send_buffer: int = Field(default=128 * 1024, ge=4096)
    sse_checkpoint_s: float = Field(default=5.0, gt=0)
    sse_max_streams_per_key: int = Field(default=32, ge=1)
    sse_max_streams: int = Field(default=10_000, ge=1)
    sse_dashboard_interval_s: float = Field(default=0.25, gt=0)
    sse_shutdown_window_s: float = Field(default=2.0, ge=0)
    sse_window_events: int = Field(default=10_000, ge=16)
    sse_page_size: int = Field(default=500, ge=1, le=10_000)
    # Browsers. CORS_ALLOWED_ORIGINS: exact origins (scheme://host[:port], comma separated) whose pages
    # may call the API and open streams (backend.http.cors); empty: no CORS headers at all. Stream
    # tokens (POST /v1/stream-tokens) open streams only and live STREAM_TOKEN_TTL_S; they are signed
    # with STREAM_TOKEN_SECRET, which every process must share (unset: derived from
    # DEPOSIT_ADDRESS_SECRET, itself shared; set it to rotate stream tokens on their own).
    cors_allowed_origins: str = ""
    stream_token_ttl_s: float = Field(default=60.0, gt=0, le=3600)
    stream_token_secret: SecretStr | None = Field(default=None, min_length=16)

    @field_validator("cors_allowed_origins")
    @classmethod
    def _exact_origins(cls, value: str) -> str:
        for origin in (part.strip() for part in value.split(",")):
            if origin and not re.fullmatch(r"https?://[^/\s*]+", origin):
                raise ValueError(f"{origin!r} is not an origin such as https://dash.example.com (no path, no '*')")
        return value

    def allowed_origins(self) -> frozenset[str]:
        return frozenset(part.strip() for part in self.cors_allowed_origins.split(",") if part.strip())

    # Audit tree (backend/audit/folder.py, docs/AUDIT.md): RUN_AUDIT_FOLDER keeps the RFC 9162 Merkle tree
    # of the log at the head (one leader across processes), AUDIT_FOLD_BATCH events per transaction.
    # With AUDIT_SIGNING_KEY_FILE (an Ed25519 PKCS#8 PEM file from `python -m backend audit keygen`, that
    # only its owner may read: serve refuses it otherwise) the leader signs a checkpoint every
    # AUDIT_CHECKPOINT_S seconds; without it nothing is signed.
    run_audit_folder: bool = True
    audit_fold_batch: int = Field(default=5000, ge=1, le=100_000)
    audit_signing_key_file: Path | None = None
    audit_checkpoint_s: float = Field(default=60.0, gt=0)

    # Read replicas (backend/store/read_pools.py): READ_DATABASE_URL is one streaming replica's DSN, or a
    # comma list (empty: every read on the primary). A replica whose lag passes REPLICA_MAX_LAG_S, or that
    # does not answer, serves no reads until a check (every REPLICA_CHECK_S) finds it back within bounds.
    read_database_url: SecretStr | None = None
    replica_max_lag_s: float = Field(default=5.0, gt=0)
    replica_check_s: float = Field(default=1.0, gt=0)

    @field_validator("read_database_url")
    @classmethod
    def _each_replica_once(cls, value: SecretStr | None) -> SecretStr | None:
        """Health and metrics tell replicas apart by host:port/database: one named twice would be two
        series of the same name, and Prometheus refuses a scrape that holds both."""
        labels = [dsn_label(dsn) for dsn in split_dsns(value.get_secret_value() if value else "")]
        if len(set(labels)) < len(labels):
            raise ValueError("names one replica (host, port and database) more than once")
        return value

    @field_validator("audit_signing_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value


def split_dsns(raw: str) -> list[str]:
    """A comma list of DSNs, split at the commas that start another URL, so a multi-host URL
    (postgresql://a,b/db) stays one."""
    return [part.strip() for part in re.split(r",\s*(?=postgres(?:ql)?://)", raw.strip()) if part.strip()]


def dsn_label(dsn: str) -> str:
    """host:port/database of a DSN: what health and metrics call a read replica (never a password)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or (query.get("host") or ["localhost"])[0]
    try:
        port = parts.port or int((query.get("port") or ["5432"])[0])
    except ValueError:
        port = 5432
    database = parts.path.lstrip("/") or (query.get("dbname") or [parts.username or ""])[0]
    return f"{host}:{port}/{database}"


def load_settings(**overrides: object) -> Settings:
    """Read Settings from the environment, turning a bad value into one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = "_".join(str(part) for part in error["loc"]).upper() or "SETTINGS"
            problems.append(f"{name}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


DATABASE_ENV = ("DATABASE_URL (unset: an embedded PostgreSQL under DATA_DIR/pg), DIRECT_DATABASE_URL (migrations "
                "and sessions; unset: DATABASE_URL), DATA_DIR, CONNECT_TIMEOUT_S, COMMAND_TIMEOUT_S, "
                "STATEMENT_TIMEOUT_MS, WAIT_FOR_DB_S")
COMMON_ENV = "ENVIRONMENT, LOG_LEVEL, LOG_FORMAT"


def env_help(*names: str, database: bool = True) -> str:
    """The `--help` epilog naming the environment variables a subcommand reads (see README's table)."""
    listed = [*([DATABASE_ENV] if database else []), *names, COMMON_ENV]
    return "environment: " + ", ".join(listed)


class OneLineErrors(argparse.ArgumentParser):
    """argparse's refusals as every other refusal of the command line: one line on stderr (not a usage
    block and a line), exit status 2. Subcommands' parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum], or a usage error saying which, so that what
    the database cannot hold never reaches it."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"must be from {minimum} to {maximum}")
        return number

    return parse


WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def cannot_write(exc: BaseException) -> bool:
    """An OSError that only writing meets (a full disk, a quota, a read-only file system, /dev/full):
    a command's refusal then names its output, not the database or a file it read."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ONLY_ERRNOS


PRODUCTION_SECRET_BYTES = 32
"""An HMAC key shorter than this guards deposit addresses and stream tokens poorly; development allows 16."""


def check_environment(settings: Settings, *, uses_database: bool, serves: bool) -> None:
    """ENVIRONMENT=production refuses what is only meant for a developer's machine: an embedded server
    started because DATABASE_URL is missing or misspelt, the published development deposit secret
    or an HMAC secret shorter than 32 bytes (serving only), and text logs (serving only). Development
    accepts all of them."""
    if settings.environment != "production":
        return
    problems = []
    if uses_database and settings.database_url is None:
        problems.append("DATABASE_URL: must be set in production (unset starts an embedded PostgreSQL under "
                        f"{settings.data_dir / 'pg'})")
    development_secret = Settings.model_fields["deposit_address_secret"].default
    if serves and settings.deposit_address_secret == development_secret:
        problems.append("DEPOSIT_ADDRESS_SECRET: the development default is refused in production; "
                        f"set a random value of at least {PRODUCTION_SECRET_BYTES} bytes")
    for name, secret in (("DEPOSIT_ADDRESS_SECRET", settings.deposit_address_secret),
                         ("STREAM_TOKEN_SECRET", settings.stream_token_secret)):
        if serves and secret is not None and len(secret.get_secret_value().encode()) < PRODUCTION_SECRET_BYTES:
            problems.append(f"{name}: shorter than {PRODUCTION_SECRET_BYTES} bytes is refused in production")
    if serves and settings.log_format == "text":
        problems.append("LOG_FORMAT: text is refused in production; use json (or auto)")
    if problems:
        raise ConfigError("refused with ENVIRONMENT=production: " + "; ".join(problems))
