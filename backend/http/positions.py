"""Log positions a client sends back (`min_position`, `X-Min-Position`, `Last-Event-ID`, `after`).

Every position this API answers with was committed before the answer left, so one beyond the log's
head was never answered by it (another database, a restored backup, a typo). Waiting for it would
end in a 503 after the whole wait (reads), or quietly skip every event up to it (streams): it is a
400 at once instead. The head this process has heard of settles most requests without a query.
"""

from __future__ import annotations

from aiohttp import web

from backend.appkeys import LISTENER, POOL
from backend.http.problems import invalid_parameters
from backend.store import reads


async def check_within_log(app: web.Application, position: int, field: str) -> None:
    """400 naming field if position is beyond the head of the log."""
    if position <= app[LISTENER].head:
        return
    log_head = await reads.head(app[POOL])
    if position > log_head:
        raise invalid_parameters((field, f"is beyond the head of the log ({log_head}): "
                                         "not a position this API answered"))
