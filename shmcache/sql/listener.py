"""LISTEN on PostgreSQL, shaped like redis-py's ``PubSub``: the receiving end of the
invalidation channel that ``TieredSessionCache`` reads (``shm+postgresql://``).

Layer: the storage layer of the database backend; knows nothing of sessions. The sending
end is the ``pg_notify`` in each delete statement (``postgres.py``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any


class Listener:
    """``LISTEN`` on a connection of its own, shaped like redis-py's ``PubSub`` (what
    ``TieredSessionCache`` reads): ``subscribe``, ``get_message(timeout=)``, ``close``.

    A connection that the server closed (a restart, ``pg_terminate_backend``) raises from
    ``get_message``; the tiered cache then subscribes again and, since notifications may
    have been lost meanwhile, empties its host's table.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None
        self._pending: collections.deque[dict[str, Any]] = collections.deque()

    def subscribe(self, channel: str) -> None:
        if self._conn is None:
            self._conn = self._connect()
        self._conn.execute(f"LISTEN {channel}")  # a checked table name + "_invalidations"
        self._pending.append({"type": "subscribe", "channel": channel, "data": 1})

    def get_message(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        if not self._pending and self._conn is not None:
            for note in self._conn.notifies(timeout=timeout or 0.0, stop_after=1):
                self._pending.append(
                    {"type": "message", "channel": note.channel, "data": note.payload.encode()}
                )
        return self._pending.popleft() if self._pending else None

    def ping(self) -> None:
        """The tiered cache's heartbeat (``_subscription.Heartbeat``): a round trip on the
        LISTEN connection, which raises if the server or the link is gone, answered as
        redis-py's PubSub answers PING, with a "pong" message. (A link that hangs rather
        than fails is bounded by the connection's TCP keepalive, see the README.)"""
        if self._conn is not None:
            self._conn.execute("SELECT 1")
            self._pending.append({"type": "pong", "channel": None, "data": b""})

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
