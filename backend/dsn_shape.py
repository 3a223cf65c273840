"""Whether a DATABASE_URL-like setting is shaped like a PostgreSQL URL, said without quoting it.

asyncpg reports a malformed URL with parts of it: `postgresql://u:se?cret@db/x` (an unescaped `?` in
the password) fails as "bad query field: 'cret@db/x'", and an out-of-range port as an OverflowError
from deep inside connect(). Checked when the settings are read, each problem is one line naming the
variable and the rule, never the value: whatever is wrong may be a piece of the password.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

SCHEMES = ("postgres", "postgresql")
SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
"""libpq's sslmode values, the ones asyncpg accepts."""
ESCAPE_HINT = "percent-encode @ : / ? # in a user name or password"
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[^\[\]:/]*)(?::(?P<port>[^:]*))?")


def dsn_problem(dsn: str) -> str | None:
    """What is wrong with dsn's shape (None: nothing this check can see; the server may still refuse it)."""
    try:
        parts = urlsplit(dsn.strip())
    except ValueError:
        return f"not a URL ({ESCAPE_HINT})"
    if parts.scheme not in SCHEMES:
        return "must start with postgresql:// (or postgres://)"
    if parts.fragment:
        return f"a '#' ends the URL early ({ESCAPE_HINT})"
    for host in parts.netloc.rpartition("@")[2].split(","):
        found = _HOST.fullmatch(host)
        port = found["port"] if found else None
        if found is None or (port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
            return f"each host must be name[:port] with a port from 1 to 65535 ({ESCAPE_HINT})"
    for item in filter(None, parts.query.split("&")):
        name, equals, value = item.partition("=")
        if not equals:
            return f"each query parameter must be name=value ({ESCAPE_HINT})"
        if unquote(name).lower() == "sslmode" and unquote(value) not in SSL_MODES:
            return "sslmode must be one of " + ", ".join(sorted(SSL_MODES))
    return None
