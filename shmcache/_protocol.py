"""The ``SessionCache`` contract, taken from the seed (``seed/session_cache.py``).

A web app's auth dependency codes against these four methods; every backend in this
package is a drop-in replacement for the seed's ``InMemorySessionCache``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


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
