"""The seed's process-local caches, kept with the seed's semantics.

``InMemorySessionCache`` is the baseline every benchmark compares against, and the cache
whose cross-worker logout bug the tests demonstrate. ``NoOpSessionCache`` is what the app
uses when caching is disabled (TTL 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class InMemorySessionCache:
    """A process-local session cache implementation (the seed's, unchanged in behaviour).

    A session invalidated in one process stays valid in every other: that is the bug
    ``SharedMemorySessionCache`` removes.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[str, tuple[Any, float]] = {}
        self._clock = clock

    def get(self, token: str) -> Any | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        session, expires_at = entry
        if self._clock() >= expires_at:
            self._entries.pop(token, None)
            return None
        return session

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        self._entries[token] = (session, self._clock() + ttl_seconds)

    def invalidate(self, token: str) -> None:
        self._entries.pop(token, None)

    def clear(self) -> None:
        self._entries.clear()


class NoOpSessionCache:
    """A no-op session cache used when caching is disabled."""

    def get(self, token: str) -> Any | None:
        return None

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        return None

    def invalidate(self, token: str) -> None:
        return None

    def clear(self) -> None:
        return None
