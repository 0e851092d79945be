"""What every SQL dialect shares: the table's shape, per-process connections, fork safety.

Layer: the storage layer of the database backend. A ``SqlStore`` runs the SQL of one
session table and knows nothing of tokens, codecs or MACs: it moves opaque keys, owners
and values (bytes) and reports whether the table's secret fingerprint was the one the
caller expected. ``sqlite.py`` and ``postgres.py`` implement it; ``cache.py`` builds
``DatabaseSessionCache`` on it.

The table (``{t}`` is ``table=``, default ``shmcache_sessions``)::

    {t}        key BYTES PRIMARY KEY     keyed BLAKE2b-128 of the token (never the token)
               owner BYTES NULL          keyed BLAKE2b-128 of str(user_id) (NULL: no user)
               expires INT64 NOT NULL    ms since the Unix epoch, on the database's clock
                                         (or the cache's ``clock=``)
               value BYTES NOT NULL      version | MAC | codec bytes (see cache.py)
               + an index on owner (WHERE owner IS NOT NULL) and one on expires
    {t}_meta   one row (id = 1): the shared secret (NULL when every client is given
               ``secret=``) and a fingerprint of the secret in use
    {t}_stamps key BYTES PRIMARY KEY, stamp INT64 NOT NULL: the leases' bookkeeping

Every statement that reads or writes sessions also checks the meta row's fingerprint in
the same statement or transaction, so a client never acts on a key space that the others
no longer use (the secret was replaced, or the tables were dropped and made again).

Leases (issue 11; ``shmcache/_leases.py``): a ``set`` that follows a miss of the same token
in the same thread is refused if a logout of that token, of the set's user, or a ``clear``
committed after the miss. The rows of ``{t}_stamps``::

    b"head"        the last stamp handed out: every logout raises it to max(head + 1,
                   the database's clock in microseconds), in the logout's transaction
    b"floor"       leases below it are void (raised by clear and by reclaims)
    b"drops"       how many sets leases refused (for stats)
    a key hash     the stamp of the last invalidate of that token     (16 bytes each:
    an owner hash  the stamp of the last invalidate_by_user of a user  keyed BLAKE2b-128)

A ``get`` that misses reads ``head`` in the same statement as the row: that is its lease.
The leased ``set`` is stored only if ``floor <= lease`` and neither its key's nor its
owner's stamp is above the lease; otherwise it deletes the token's row instead (no older
copy is served either) and counts a drop. Stamps are ordered by commit: every logout
updates ``head`` (SQLite: writers take turns; PostgreSQL: the row lock), so a logout that
was not committed when the ``get`` read ``head`` stamps above it. The check and the write
are one step for every logout: SQLite's writers take turns on the file; on PostgreSQL
the leased set and the logouts are functions that lock before they read
(``pg_leases.py`` says why a statement's snapshot is not enough).

What a missing stamp means: "no logout since the floor". Stamp rows older than the lease
timeout are reclaimed with expired sessions, and the reclaim raises ``floor`` to the
newest stamp it deletes in the same transaction, so a lease old enough to have seen a
deleted stamp is void, never let through. ``clear`` deletes every stamp and raises
``floor`` to its own. Missing ``head`` or ``floor`` rows (PostgreSQL empties an UNLOGGED
table after a crash) void every lease: the next ``get`` that notices starts them again
at the database's clock, above every lease handed out before.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .._errors import InvalidArgument

MAX_TABLE = 48  # PostgreSQL identifiers end at 63 bytes; "_invalidations" takes 14 more
_TABLE = re.compile(r"[a-z_][a-z0-9_]*\Z")
C = TypeVar("C")
T = TypeVar("T")

# The special rows of {t}_stamps (see the module docstring); every other key is 16 bytes.
HEAD, FLOOR, DROPS = b"head", b"floor", b"drops"
HASH_BYTES = 16
Row = tuple[bytes, "bytes | None", int]  # value, owner, ms left

# A forked child must never use (nor close: PQfinish/sqlite3_close would act on the
# parent's sockets and locks) what it inherited: those objects are parked here for the
# life of the child instead of being garbage-collected.
_INHERITED: list[Any] = []
_stores: weakref.WeakSet[SqlStore] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store.forget_connections()


os.register_at_fork(after_in_child=_after_fork_in_child)


def check_table(table: object) -> str:
    """A table name we can put in SQL unquoted: lowercase ASCII letters, digits and ``_``,
    not starting with a digit, at most ``MAX_TABLE`` characters."""
    if not isinstance(table, str) or not _TABLE.match(table) or len(table) > MAX_TABLE:
        raise InvalidArgument(
            f"table must be lowercase letters, digits and '_' (not starting with a digit), "
            f"at most {MAX_TABLE} characters; got {table!r}"
        )
    return table


class StaleFingerprint(Exception):
    """The meta row is missing or holds another fingerprint: nothing was changed."""


class LocalPool(Generic[C]):
    """This process's idle connections, handed to one thread at a time.

    ``factory`` makes a connection; ``close`` closes one. A connection whose call raised
    is closed, not reused (it may be mid-transaction or broken).
    """

    def __init__(
        self, factory: Callable[[], C], close: Callable[[C], None], max_idle: int = 8
    ) -> None:
        self._factory = factory
        self._close = close
        self._max_idle = max_idle
        self._idle: list[C] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[C]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._factory()
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception):
                self._close(conn)
            raise
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        self._close(conn)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                self._close(conn)

    def abandon(self) -> None:
        """After a fork, in the child: keep the parent's connections alive, unused."""
        with self._lock:
            _INHERITED.extend(self._idle)
            self._idle = []


class SqlStore(ABC):
    """One session table on one database, used by one ``DatabaseSessionCache``.

    Methods take ``now`` (ms on the caller's clock, or None for the database's clock) and
    ``fp`` (the fingerprint the caller hashes with); those that touch sessions raise
    ``StaleFingerprint`` when the meta row does not hold ``fp``. Every method may raise one
    of ``errors`` when the database cannot be reached, is locked past the timeout, or
    refuses the statement.
    """

    dialect = ""
    errors: tuple[type[BaseException], ...] = ()

    def __init__(self, table: str, timeout: float) -> None:
        self.table = check_table(table)
        self.meta = table + "_meta"
        self.stamps = table + "_stamps"
        self.channel = table + "_invalidations"
        self.timeout = timeout
        self._schema_ready = False
        self._setup_lock = threading.Lock()
        _stores.add(self)

    # -- connections ---------------------------------------------------------------------

    def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` on one of this process's connections, with the tables made
        once per object (again if someone dropped them)."""
        if not self._schema_ready:
            with self._setup_lock:
                if not self._schema_ready:
                    self._with_connection(self.create_schema)
                    self._schema_ready = True
        try:
            return self._with_connection(fn)
        except self.errors as exc:
            if not self.is_missing_table(exc):
                raise
        with self._setup_lock:
            self._with_connection(self.create_schema)
        return self._with_connection(fn)

    @abstractmethod
    def _with_connection(self, fn: Callable[[Any], T]) -> T:
        ...

    @abstractmethod
    def describe(self) -> str:
        """The database, for messages (never a password)."""
        ...

    def forget_connections(self) -> None:  # noqa: B027 (a default, not an abstract method)
        """In a forked child: drop (without closing) the parent's connections. The default:
        a store that keeps none has nothing to drop."""

    @abstractmethod
    def close(self) -> None:
        ...

    # -- the dialect's SQL ---------------------------------------------------------------

    @abstractmethod
    def create_schema(self, conn: Any) -> None:
        ...

    @abstractmethod
    def is_missing_table(self, exc: BaseException) -> bool:
        ...

    @abstractmethod
    def read_meta(self) -> tuple[bytes | None, bytes] | None:
        """``(secret or None, fingerprint)`` of the meta row, or None if there is none."""
        ...

    @abstractmethod
    def create_meta(self, secret: bytes | None, fp: bytes) -> tuple[bytes | None, bytes]:
        """Write the meta row unless one exists (then announce ``b"c"``: every key made
        under an older secret is orphaned); return the row that is there now."""
        ...

    @abstractmethod
    def lookup(self, key: bytes, fp: bytes, now: int | None) -> tuple[Row | None, int | None]:
        """``(value, owner, ms left)`` of the live row of ``key`` or None, and, read in the
        same statement, the lease a miss takes: the ``head`` stamp (None if the stamps
        were lost: ``restart_stamps``)."""
        ...

    @abstractmethod
    def store(
        self, key: bytes, owner: bytes | None, value: bytes, ttl_ms: int, fp: bytes,
        now: int | None, lease: int | None = None,
    ) -> bool:
        """Write the row; with a ``lease``, only if no logout of ``key``, of ``owner``, nor
        a clear came after it (checked atomically with the write), else delete ``key``'s
        row and count a drop. True if stored."""
        ...

    @abstractmethod
    def drop(self, key: bytes, fp: bytes) -> None:
        """A set refused before it reached the database (its lease expired): delete
        ``key``'s row (no older copy is served) and count a drop."""
        ...

    @abstractmethod
    def restart_stamps(self) -> None:
        """Make ``head`` and ``floor`` again if they are missing, both at the database's
        clock: every lease handed out before is void (its logouts may be lost)."""
        ...

    @abstractmethod
    def remove(self, key: bytes, fp: bytes, message: str) -> None:
        """Delete ``key``, stamp it, and send ``message`` (PostgreSQL: NOTIFY) in one
        transaction."""
        ...

    @abstractmethod
    def revoke(self, owner: bytes, fp: bytes, now: int | None, message: str) -> int:
        """Delete every row of ``owner``, stamp it (and send ``message``) in one
        transaction; returns how many of them were live."""
        ...

    @abstractmethod
    def clear(self, fp: bytes, message: str) -> None:
        """Delete every row and every stamp, and raise ``floor`` to a new stamp."""
        ...

    @abstractmethod
    def reclaim_stamps(self, age_ms: int) -> int:
        """Delete the stamps older than ``age_ms`` (on the database's clock) and raise
        ``floor`` to the newest of them, in one transaction; returns how many."""
        ...

    @abstractmethod
    def purge(self, now: int | None, limit: int | None = None) -> int:
        """Delete expired rows (at most ``limit``, oldest first); returns how many."""
        ...

    @abstractmethod
    def delete_keys(self, keys: list[bytes]) -> int:
        ...

    @abstractmethod
    def counts(self, now: int | None) -> dict[str, Any]:
        """Table-wide figures: live and expired rows, users with live rows, stamps and
        lease drops, and what the dialect adds."""
        ...

    @abstractmethod
    def rows(self, batch: int = 1000) -> Iterator[tuple[bytes, bytes | None, bytes]]:
        """Every ``(key, owner, value)``, in key order, ``batch`` rows per statement."""
        ...

    @abstractmethod
    def problems(self, shared_secret: bool) -> list[str]:
        """What the dialect itself finds wrong (database integrity, file permissions)."""
        ...

    def listen(self) -> Any:
        """A subscription to ``channel`` (see ``shmcache._remote.RemoteTier``)."""
        raise InvalidArgument(
            f"{self.dialect} has no invalidation channel: in front of one database file, "
            "the host's shared memory alone (shm://) already sees every logout; across "
            "hosts use shm+postgresql://"
        )
