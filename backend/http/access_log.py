"""Access log lines as structured records (method, path, status, duration, request id)."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from backend.http.middlewares import REQUEST_ID
from backend.logs import redact


class AccessLogger(AbstractAccessLogger):
    @property
    def enabled(self) -> bool:
        """aiohttp skips log() entirely when this is False (LOG_LEVEL above INFO)."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        path = redact(request.path)  # a key pasted into a path must not reach the log
        self.logger.info(
            "%s %s %s",
            request.method,
            path,
            response.status,
            extra={
                "method": request.method,
                "path": path,
                "status": response.status,
                "duration_ms": round(time * 1000, 2),
                "request_id": request.get(REQUEST_ID),
                "remote": request.remote,
            },
        )
