"""The seed's process-local caches, kept with the seed's semantics.

``InMemorySessionCache`` is the baseline every benchmark compares against, and the cache
whose cross-worker logout bug the tests demonstrate. ``NoOpSessionCache`` is what the app
uses when caching is disabled (TTL 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ._args import user_key
from ._protocol import UserIdOf


class InMemorySessionCache:
    """A process-local session cache implementation (the seed's, unchanged in behaviour).

    A session invalidated in one process stays valid in every other: that is the bug
    ``SharedMemorySessionCache`` removes. Like the seed's later version, it keeps a
    ``user -> tokens`` index for ``invalidate_by_user``, with the same per-process bug.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        user_id_of: UserIdOf | None = None,
    ) -> None:
        self._entries: dict[str, tuple[Any, float, str | None]] = {}
        self._by_user: dict[str, set[str]] = {}
        self._clock = clock
        self._user_id_of = user_id_of

    def get(self, token: str) -> Any | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        session, expires_at, _ = entry
        if self._clock() >= expires_at:
            self._drop(token)
            return None
        return session

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        if user_id is None and self._user_id_of is not None:
            user_id = self._user_id_of(session)
        user = None if user_id is None else user_key(user_id)
        self._drop(token)
        self._entries[token] = (session, self._clock() + ttl_seconds, user)
        if user is not None:
            self._by_user.setdefault(user, set()).add(token)

    def invalidate(self, token: str) -> None:
        self._drop(token)

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Drop this process's sessions of ``user_id``; returns how many were live."""
        now = self._clock()
        dropped = 0
        for token in self._by_user.pop(user_key(user_id), set()):
            entry = self._entries.pop(token, None)
            if entry is not None and now < entry[1]:
                dropped += 1
        return dropped

    def clear(self) -> None:
        self._entries.clear()
        self._by_user.clear()

    def _drop(self, token: str) -> None:
        entry = self._entries.pop(token, None)
        if entry is not None and entry[2] is not None:
            tokens = self._by_user.get(entry[2])
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._by_user[entry[2]]


class NoOpSessionCache:
    """A no-op session cache used when caching is disabled."""

    def get(self, token: str) -> Any | None:
        return None

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        return None

    def invalidate(self, token: str) -> None:
        return None

    def invalidate_by_user(self, user_id: str | int) -> int:
        user_key(user_id)  # the same argument errors as every other backend
        return 0

    def clear(self) -> None:
        return None
