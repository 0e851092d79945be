"""The seed app's ``InMemorySessionCache``, verbatim (``seed/session_cache.py``, with its
``Session`` type spelled ``Any``): the baseline of every ratio.

``shmcache.InMemorySessionCache`` started as this class and has since grown a per-user
index for ``invalidate_by_user``, which makes its ``set`` dearer; measuring against it would
flatter every other backend. It is measured too, as a row of its own.
"""

from __future__ import annotations

import time
from typing import Any


class InMemorySessionCache:
    """A process-local session cache implementation."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Any, float]] = {}

    def get(self, token: str) -> Any | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        session, expires_at = entry
        if time.monotonic() >= expires_at:
            self._entries.pop(token, None)
            return None
        return session

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        self._entries[token] = (session, time.monotonic() + ttl_seconds)

    def invalidate(self, token: str) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        self._entries.clear()
