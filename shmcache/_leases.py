"""Leases: a validation that raced a logout never puts the logged-out token back.

The cache-aside race (FIELD-NOTES 8): a request misses, reads the session row, and while it
is between that read and its ``set`` a logout deletes the row and calls ``invalidate``; the
late ``set`` would then make the logged-out token a hit everywhere until its TTL ends.
Memcache at Facebook closes it with leases, and so does every backend here:

* a ``get`` that misses records, for this thread, the token's *stamp*: a value of the
  backend's that every ``invalidate`` of the token, every ``invalidate_by_user`` and every
  ``clear`` changes (shm: a per-bucket word and two counters; Redis and SQL: a version kept
  beside the sessions);
* the thread's next ``set`` of that token hands the stamp to the backend, which stores the
  session only if the stamp is unchanged, checked atomically with the write (under the
  segment lock, in the Lua script, in the transaction). Otherwise the set is dropped:
  the racing request may use its session, but the cache does not keep it;
* a ``set`` with no miss before it (a fresh login) is stored as before;
* a lease older than ``timeout`` is void: the set is dropped, which costs only a later miss.

Shared vocabulary: imports nothing of any backend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT = 10.0  # seconds: longer than any validation should take
_MAX_PER_THREAD = 4096  # misses remembered per thread before the oldest are forgotten

NO_LEASE: Any = object()  # take(): this thread saw no miss of the token: store as usual
EXPIRED: Any = object()  # take(): the miss is older than the timeout: do not store


class Leases:
    """The leases of one cache object, one map per thread (a lease is the thread's own)."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, clock: Callable[[], float] | None = None):
        self.timeout = timeout
        self._clock = clock if clock is not None else time.monotonic
        self._tls = threading.local()

    def grant(self, token: str, stamp: Any) -> None:
        """Record a miss of ``token`` with the backend's current ``stamp``. An earlier,
        still valid lease of the same token is kept: the first miss is what a later
        logout must void."""
        try:
            leases: dict[str, tuple[Any, float]] = self._tls.leases
        except AttributeError:
            leases = self._tls.leases = {}
        now = self._clock()
        held = leases.get(token)
        if held is not None and now - held[1] < self.timeout:
            return
        if len(leases) >= _MAX_PER_THREAD and token not in leases:
            self._prune(leases, now)
        leases[token] = (stamp, now)

    def take(self, token: str) -> Any:
        """The stamp of this thread's lease on ``token`` (consumed), ``NO_LEASE`` or
        ``EXPIRED``."""
        leases = self._tls.__dict__.get("leases")
        if not leases:
            return NO_LEASE
        held = leases.pop(token, None)
        if held is None:
            return NO_LEASE
        if self._clock() - held[1] >= self.timeout:
            return EXPIRED
        return held[0]

    def forget(self, token: str) -> None:
        """This thread's lease on ``token`` is moot (e.g. its own invalidate)."""
        leases = self._tls.__dict__.get("leases")
        if leases:
            leases.pop(token, None)

    def _prune(self, leases: dict[str, tuple[Any, float]], now: float) -> None:
        for token, (_, since) in list(leases.items()):
            if now - since >= self.timeout:
                del leases[token]
        excess = len(leases) - _MAX_PER_THREAD // 2
        for token in list(leases)[: max(0, excess)]:
            del leases[token]
