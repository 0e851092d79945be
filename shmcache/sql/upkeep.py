"""The administrator's side of ``DatabaseSessionCache``: figures, integrity, upkeep.

Layer: backends. A mixin of the cache class, split out so each file reads in one sitting:
what a request needs (``get``/``set``/``invalidate``, the secret) is in ``cache.py``; what
``shmcache stats``, ``check`` and ``purge`` need, and the reclaim that sets run as they
go, is here. It uses the cache's store and helpers; it imports nothing above ``sql/``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import CacheUnavailable, SecretMismatch
from .store import SqlStore
from .values import Secret, open_value

T = TypeVar("T")

RECLAIM_EVERY = 128  # sets between two reclaims of expired rows, per process
RECLAIM_BATCH = 256  # expired rows deleted per reclaim: twice what the sets in between add


class DatabaseUpkeep:
    """Stats, check, purge and the reclaim (see the module docstring)."""

    _store: SqlStore
    _fixed: Secret | None
    _fail_open: bool
    _hits: int
    _misses: int
    _unavailable: int
    _decode_errors: int
    _reclaimed: int
    _lease_drops: int
    _lease_timeout: float
    _stamp_age_ms: int

    if TYPE_CHECKING:  # the cache's own (cache.py)
        def _ensure_open(self) -> None: ...
        def _now(self) -> int | None: ...
        def _call(self, op: str, fn: Callable[[], T]) -> T: ...
        def _current(self, op: str) -> tuple[Secret, bytes]: ...

    def purge(self) -> int:
        """Delete expired rows now, and rows that fail their MAC (damaged, written without
        the secret, or under a secret no longer in use); returns how many. Writes also
        reclaim expired rows as they go (a batch every ``RECLAIM_EVERY`` sets)."""
        self._ensure_open()
        expired = self._call("purge", lambda: self._store.purge(self._now()))
        self._call("purge", lambda: self._store.reclaim_stamps(self._stamp_age_ms))
        damaged = self._damaged()
        removed = self._call("purge", lambda: self._store.delete_keys(damaged)) if damaged else 0
        return int(expired) + int(removed)

    def check(self) -> list[str]:
        """Integrity problems, ``[]`` when whole: the secret, the database's own check
        (SQLite), file permissions, and every row's format and MAC."""
        self._ensure_open()
        try:
            self._current("check")
        except SecretMismatch as exc:
            return [str(exc)]
        problems = self._call(
            "check", lambda: self._store.problems(shared_secret=self._fixed is None)
        )
        damaged = self._damaged()
        if damaged:
            problems.append(
                f"{len(damaged)} rows fail their format or MAC check (damaged, written "
                "without the secret, or under an older one): misses for every client; "
                "purge() removes them"
            )
        return list(problems)

    def stats(self) -> dict[str, Any]:
        """This process's counters, and the table's figures (``entries``, ``expired``,
        ``users``; ``error`` instead if the database could not be reached)."""
        self._ensure_open()
        out: dict[str, Any] = {
            "backend": "database",
            "dialect": self._store.dialect,
            "database": self._store.describe(),
            "table": self._store.table,
            "hits": self._hits,
            "misses": self._misses,
            "unavailable": self._unavailable,
            "decode_errors": self._decode_errors,
            "reclaimed": self._reclaimed,
            "process_lease_drops": self._lease_drops,
            "lease_timeout": self._lease_timeout,
            "fail_open": self._fail_open,
            "shared_secret": self._fixed is None,
        }
        try:
            out.update(self._call("stats", lambda: self._store.counts(self._now())))
        except CacheUnavailable as exc:
            out["error"] = str(exc)
        return out

    # -- helpers -------------------------------------------------------------------------

    def _damaged(self) -> list[bytes]:
        secret = self._current("check")[0]

        def scan() -> list[bytes]:
            table = self._store.table
            return [key for key, owner, value in self._store.rows()
                    if open_value(secret, table, key, owner, value) is None]

        return self._call("check", scan)

    def _reclaim(self) -> None:
        # A failure is counted; the set itself succeeded, and the next reclaim tries again.
        with contextlib.suppress(CacheUnavailable):
            self._reclaimed += self._call(
                "reclaim", lambda: self._store.purge(self._now(), RECLAIM_BATCH)
            )
            # Stamps older than a lease can be are of no use to any lease of this
            # timeout (a client with a longer one may see a false drop: allowed).
            self._call("reclaim", lambda: self._store.reclaim_stamps(self._stamp_age_ms))
