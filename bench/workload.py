"""Tokens and sessions shaped like the seed app's (43-character urlsafe tokens; a Session
with id, token, created_at, expires_at)."""

from __future__ import annotations

import random
import secrets
from typing import Any

TTL = 3600.0  # long enough that nothing expires during a measurement


def tokens(n: int, rng: random.Random | None = None) -> list[str]:
    if rng is None:
        return [secrets.token_urlsafe(32) for _ in range(n)]
    return [rng.randbytes(32).hex()[:43] for _ in range(n)]


def session(token: str, i: int = 1) -> dict[str, Any]:
    """About 200 bytes pickled (201-204): the session size of issue 15's first-read goal."""
    return {
        "id": i,
        "token": token,
        "user_id": f"user-{i:08d}",
        "role": "member",
        "created_at": "2026-11-27T10:00:00+00:00",
        "expires_at": "2026-12-27T10:00:00+00:00",
    }


def chunks(pool: list[str], size: int) -> list[list[str]]:
    """``pool`` cut into consecutive batches of ``size`` (at least one batch)."""
    size = max(1, min(size, len(pool)))
    return [pool[k : k + size] for k in range(0, len(pool) - size + 1, size)]
