"""The listening site moved to backend.server.site (aiohttp-specific server code lives there)."""

from backend.server.site import BatchAcceptSite, CannotListen

__all__ = ["BatchAcceptSite", "CannotListen"]
