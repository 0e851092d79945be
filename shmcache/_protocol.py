"""The ``SessionCache`` contract, taken from the seed (``seed/session_cache.py``).

A web app's auth dependency codes against these four methods; every backend in this
package is a drop-in replacement for the seed's ``InMemorySessionCache``. The app later
added "log a user out everywhere": ``UserSessionCache`` is that extension, and every
backend here implements it too (``set`` takes a keyword-only ``user_id``, so the seed's
three-argument calls keep working).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

UserIdOf = Callable[[Any], "str | int | None"]


@runtime_checkable
class SessionCache(Protocol):
    """Interface for session token validation cache backends."""

    def get(self, token: str) -> Any | None:
        """Return the cached session for *token*, or ``None`` if missing."""

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        """Cache the validated *session* for *token* for *ttl_seconds*."""

    def invalidate(self, token: str) -> None:
        """Remove *token* from the cache if it exists."""

    def clear(self) -> None:
        """Remove all entries from the cache."""


@runtime_checkable
class UserSessionCache(SessionCache, Protocol):
    """A ``SessionCache`` that can also drop every session of one user at once."""

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        """Cache *session* for *token*; ``user_id`` (or the cache's ``user_id_of(session)``)
        names the user it belongs to."""

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Drop every session of *user_id* (compared by ``str()``); return how many."""
