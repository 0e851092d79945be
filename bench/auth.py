"""Signed tokens like the seed app's (``raw.hmac``), shared by the app and the driver."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any


def sign(raw: str, secret: bytes) -> str:
    mac = hmac.new(secret, raw.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{raw}.{mac}"


def validate(token: str, secret: bytes) -> dict[str, Any] | None:
    """The session for a well-signed token (the stand-in for the database lookup)."""
    raw, _, _ = token.rpartition(".")
    if not raw or not hmac.compare_digest(sign(raw, secret), token):
        return None
    return {
        "id": int(hashlib.blake2b(raw.encode(), digest_size=4).hexdigest(), 16),
        "token": token,
        "created_at": "2026-11-27T10:00:00+00:00",
        "expires_at": "2026-12-27T10:00:00+00:00",
    }
