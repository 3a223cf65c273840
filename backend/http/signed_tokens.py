"""Signing and checking stream tokens, statelessly: ``tst_<key id>_<expiry, unix seconds>_<HMAC-SHA256
of both>``. Any process verifies one, because the HMAC key is shared: STREAM_TOKEN_SECRET, or a key
derived from DEPOSIT_ADDRESS_SECRET (which every process shares too) by HMAC with a fixed label."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime
from uuid import UUID

from backend.config import Settings

PREFIX = "tst_"
_DERIVATION = b"tally/stream-tokens/v1"


class StreamTokens:
    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamTokens:
        if settings.stream_token_secret is not None:
            secret = settings.stream_token_secret.get_secret_value().encode()
        else:
            base = settings.deposit_address_secret.get_secret_value().encode()
            secret = hmac.new(base, _DERIVATION, hashlib.sha256).digest()
        return cls(secret, settings.stream_token_ttl_s)

    def _mac(self, key_id: UUID, expires: int) -> str:
        digest = hmac.new(self._secret, b"%s.%d" % (key_id.hex.encode(), expires), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, key_id: UUID, now: float | None = None) -> tuple[str, datetime]:
        expires = int((time.time() if now is None else now) + self.ttl_s + 0.999)
        token = f"{PREFIX}{key_id.hex}_{expires}_{self._mac(key_id, expires)}"
        return token, datetime.fromtimestamp(expires, UTC)

    def verify(self, token: str, now: float | None = None) -> UUID | None:
        """The key id a genuine, unexpired token was issued for; None for anything else."""
        if not token.isascii():  # else '²' passes isdigit() and fails int(), and compare_digest() raises
            return None
        parts = token.removeprefix(PREFIX).split("_", 2)  # the MAC (base64url) may hold "_"
        if not token.startswith(PREFIX) or len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 12:
            return None
        try:
            key_id = UUID(hex=parts[0])
        except ValueError:
            return None
        expires = int(parts[1])
        if not hmac.compare_digest(parts[2], self._mac(key_id, expires)):
            return None
        return key_id if (time.time() if now is None else now) < expires else None

