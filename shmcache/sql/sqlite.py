"""The session table on SQLite: one database file that every process of one host opens.

Layer: the storage layer of the database backend (see ``store.py``); knows nothing of
tokens or sessions. Uses only the standard library's ``sqlite3``.

- WAL mode (set on every connection; it persists in the file): readers never wait for a
  writer, and a writer killed mid-transaction leaves nothing half-written (its frames are
  never committed; the kernel drops its locks).
- ``timeout`` is SQLite's busy timeout: a write that cannot get the lock in that time
  fails (``database is locked``), and ``DatabaseSessionCache`` turns that into
  ``CacheUnavailable``.
- Connections are per process (a forked child opens its own) and handed to one thread at a
  time. Writes that read first (logouts) run in ``BEGIN IMMEDIATE``, so two of them never
  deadlock on a lock upgrade.
- Durability: ``synchronous=NORMAL`` for sets (a power cut may lose the last ones: those
  sessions are validated again), ``FULL`` for logouts that delete a row, so a logout that
  returned survives a power cut. A logout that finds no row writes only its lease stamp,
  with ``NORMAL``: a power cut ends every lease with the processes that held them, and
  an fsync per logout of an uncached token would make every writer wait behind it.
- The file is created 0600: it holds the shared secret (when ``secret=`` is not given),
  and whoever can read that secret can forge values.
- The clock: SQLite's own ``julianday('now')`` (the host's wall clock, in ms), unless the
  cache was given ``clock=``. Lease stamps always use the host's clock (in microseconds).
- Leases (``store.py``): writers take turns on the file, so a leased set's single
  ``INSERT ... SELECT ... WHERE`` (fingerprint, floor, stamps) is atomic with respect to
  every logout, whose stamp and delete share one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .._errors import InvalidType
from .store import DROPS, FLOOR, HASH_BYTES, HEAD, LocalPool, Row, SqlStore, StaleFingerprint

NOW = "COALESCE(:now, CAST(round((julianday('now') - 2440587.5) * 86400000) AS INTEGER))"
T = TypeVar("T")
NOW_US = "CAST(round((julianday('now') - 2440587.5) * 86400000000.0) AS INTEGER)"


class _NotDurable(Exception):
    """A logout found a row to delete in a transaction begun without ``FULL``."""


def _private_file(path: str) -> None:
    """Create ``path`` empty and owner-only if it does not exist (SQLite would make it
    0644 under the usual umask)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))


class SqliteStore(SqlStore):
    dialect = "sqlite"
    errors = (sqlite3.Error, OSError)

    def __init__(
        self,
        table: str,
        timeout: float,
        *,
        path: str | None = None,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(table, timeout)
        self.path = path
        self._connect = connect
        self._pool: LocalPool[sqlite3.Connection] = self._new_pool()

    def describe(self) -> str:
        return f"sqlite:///{self.path}" if self.path else "sqlite (connect=)"

    # -- connections ---------------------------------------------------------------------

    def _new_pool(self) -> LocalPool[sqlite3.Connection]:
        return LocalPool(self._open, lambda conn: conn.close())

    def _open(self) -> sqlite3.Connection:
        if self._connect is not None:
            conn = self._connect()
            if not isinstance(conn, sqlite3.Connection):
                raise InvalidType(
                    f"connect= must return a sqlite3 connection for dialect 'sqlite', got "
                    f"{type(conn).__name__}"
                )
        else:
            assert self.path is not None
            _private_file(self.path)
            conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False)
        try:
            conn.isolation_level = None  # autocommit; transactions are explicit
            conn.execute(f"PRAGMA busy_timeout = {round(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _with_connection(self, fn: Callable[[Any], Any]) -> Any:
        with self._pool.connection() as conn:
            return fn(conn)

    def forget_connections(self) -> None:
        self._pool.abandon()
        self._pool = self._new_pool()

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection, durable: bool = False) -> Iterator[None]:
        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if durable:
                conn.execute("PRAGMA synchronous = NORMAL")

    def _check_fp(self, conn: sqlite3.Connection, fp: bytes) -> None:
        row = conn.execute(f"SELECT fingerprint FROM {self.meta} WHERE id = 1").fetchone()
        if row is None or row[0] != fp:
            raise StaleFingerprint

    # -- schema and meta -----------------------------------------------------------------

    def create_schema(self, conn: sqlite3.Connection) -> None:
        t = self.table
        (found,) = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN (?, ?, ?)",
            (t, self.meta, self.stamps),
        ).fetchone()
        if found == 3:
            return  # no write transaction: a process starting while a writer waits starts
        with self._write(conn):
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {t} (key BLOB PRIMARY KEY, owner BLOB, "
                "expires INTEGER NOT NULL, value BLOB NOT NULL) WITHOUT ROWID"
            )
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {t}_owner ON {t} (owner) WHERE owner IS NOT NULL"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.meta} (id INTEGER PRIMARY KEY "
                "CHECK (id = 1), secret BLOB, fingerprint BLOB NOT NULL)"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.stamps} (key BLOB PRIMARY KEY, "
                "stamp INTEGER NOT NULL) WITHOUT ROWID"
            )
            self._restart_stamps(conn)

    def is_missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc)

    def read_meta(self) -> tuple[bytes | None, bytes] | None:
        def op(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                f"SELECT secret, fingerprint FROM {self.meta} WHERE id = 1"
            ).fetchone()

        row = self.run(op)
        return None if row is None else (row[0], row[1])

    def create_meta(self, secret: bytes | None, fp: bytes) -> tuple[bytes | None, bytes]:
        def op(conn: sqlite3.Connection) -> Any:
            with self._write(conn, durable=True):
                conn.execute(
                    f"INSERT INTO {self.meta} (id, secret, fingerprint) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO NOTHING",
                    (secret, fp),
                )
                return conn.execute(
                    f"SELECT secret, fingerprint FROM {self.meta} WHERE id = 1"
                ).fetchone()

        row = self.run(op)
        return row[0], row[1]

    # -- sessions ------------------------------------------------------------------------

    def lookup(self, key: bytes, fp: bytes, now: int | None) -> tuple[Row | None, int | None]:
        sql = (
            f"SELECT m.fingerprint, s.value, s.owner, s.expires - {NOW}, "
            f"(SELECT h.stamp FROM {self.stamps} h, {self.stamps} f "
            "WHERE h.key = :head AND f.key = :floor) "
            f"FROM {self.meta} m LEFT JOIN {self.table} s ON s.key = :key "
            f"AND s.expires > {NOW} WHERE m.id = 1"
        )
        params = {"key": key, "now": now, "head": HEAD, "floor": FLOOR}
        row = self.run(lambda conn: conn.execute(sql, params).fetchone())
        if row is None or row[0] != fp:
            raise StaleFingerprint
        return (None if row[1] is None else (row[1], row[2], row[3])), row[4]

    def store(
        self, key: bytes, owner: bytes | None, value: bytes, ttl_ms: int, fp: bytes,
        now: int | None, lease: int | None = None,
    ) -> bool:
        # One statement: written only if the meta row holds the caller's fingerprint and,
        # for a leased set, if no logout came after the lease (the writers' lock makes the
        # check and the write one step for every other writer).
        leased = (
            f"AND (SELECT stamp FROM {self.stamps} WHERE key = :floor) <= :lease "
            f"AND NOT EXISTS (SELECT 1 FROM {self.stamps} WHERE key IN (:key, :owner) "
            "AND stamp > :lease) "
        ) if lease is not None else ""
        sql = (
            f"INSERT INTO {self.table} (key, owner, expires, value) "
            f"SELECT :key, :owner, {NOW} + :ttl, :value FROM {self.meta} "
            f"WHERE id = 1 AND fingerprint = :fp {leased}"
            "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
            "expires = excluded.expires, value = excluded.value"
        )
        params = {"key": key, "owner": owner, "ttl": ttl_ms, "value": value, "fp": fp,
                  "now": now, "lease": lease, "floor": FLOOR}
        # (Not in an explicit transaction: a thread that holds the writers' lock across
        # statements can lose the GIL between them, and every other writer waits.)
        if self.run(lambda conn: conn.execute(sql, params).rowcount) == 1:
            return True
        if lease is None:
            raise StaleFingerprint
        self.drop(key, fp)  # (a refusal stays one: stamps and the floor only rise)
        return False

    def drop(self, key: bytes, fp: bytes) -> None:
        def op(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                self._drop(conn, key, fp)

        self.run(op)

    def _drop(self, conn: sqlite3.Connection, key: bytes, fp: bytes) -> None:
        """Caller holds the write lock."""
        self._check_fp(conn, fp)
        conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,))
        conn.execute(f"UPDATE {self.stamps} SET stamp = stamp + 1 WHERE key = ?", (DROPS,))

    def restart_stamps(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            with self._write(conn):
                self._restart_stamps(conn)

        self.run(op)

    def _restart_stamps(self, conn: sqlite3.Connection) -> None:
        """Caller holds the write lock."""
        (present,) = conn.execute(
            f"SELECT count(*) FROM {self.stamps} WHERE key IN (?, ?)", (HEAD, FLOOR)
        ).fetchone()
        if present != 2:
            conn.execute(
                f"INSERT INTO {self.stamps} (key, stamp) VALUES (?, {NOW_US}), (?, {NOW_US}) "
                "ON CONFLICT (key) DO UPDATE SET stamp = max(stamp, excluded.stamp)",
                (HEAD, FLOOR),
            )
        conn.execute(
            f"INSERT INTO {self.stamps} (key, stamp) VALUES (?, 0) ON CONFLICT DO NOTHING",
            (DROPS,),
        )

    def _stamp(self, conn: sqlite3.Connection, key: bytes | None) -> None:
        """A new stamp, above every lease handed out so far, on ``key`` (a key or owner
        hash; None: the floor, for clear). Caller holds the write lock. Two statements:
        the lock is held across each (see ``store``)."""
        cur = conn.execute(
            f"UPDATE {self.stamps} SET stamp = max(stamp + 1, {NOW_US}) WHERE key = ?",
            (HEAD,),
        )
        if cur.rowcount != 1:  # the stamps were lost: start again, above every lease
            self._restart_stamps(conn)
        conn.execute(
            f"INSERT INTO {self.stamps} (key, stamp) SELECT ?, stamp FROM {self.stamps} "
            "WHERE key = ? ON CONFLICT (key) DO UPDATE SET stamp = max(stamp, excluded.stamp)",
            (FLOOR if key is None else key, HEAD),
        )

    def remove(self, key: bytes, fp: bytes, message: str) -> None:
        def body(conn: sqlite3.Connection) -> tuple[None, int]:
            self._check_fp(conn, fp)
            self._stamp(conn, key)
            cur = conn.execute(f"DELETE FROM {self.table} WHERE key = ?", (key,))
            return None, cur.rowcount

        exists = f"SELECT 1 FROM {self.table} WHERE key = :key"
        self.run(lambda conn: self._logout(conn, exists, {"key": key}, body))

    def revoke(self, owner: bytes, fp: bytes, now: int | None, message: str) -> int:
        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            self._check_fp(conn, fp)
            (live,) = conn.execute(
                f"SELECT count(*) FROM {self.table} WHERE owner = :owner "
                f"AND expires > {NOW}",
                {"owner": owner, "now": now},
            ).fetchone()
            self._stamp(conn, owner)
            cur = conn.execute(f"DELETE FROM {self.table} WHERE owner = ?", (owner,))
            return int(live), cur.rowcount

        exists = f"SELECT 1 FROM {self.table} WHERE owner = :owner LIMIT 1"
        return int(self.run(lambda conn: self._logout(conn, exists, {"owner": owner}, body)))

    def clear(self, fp: bytes, message: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            with self._write(conn, durable=True):
                self._check_fp(conn, fp)
                self._stamp(conn, None)
                conn.execute(
                    f"DELETE FROM {self.stamps} WHERE length(key) = {HASH_BYTES}"
                )
                conn.execute(f"DELETE FROM {self.table}")

        self.run(op)

    def _logout(
        self, conn: sqlite3.Connection, exists: str, params: dict[str, Any],
        body: Callable[[sqlite3.Connection], tuple[T, int]],
    ) -> T:
        """``body`` (returning its result and how many rows it deleted) in one write
        transaction, durable (``FULL``) if it deletes rows. ``exists`` guesses that
        beforehand; a row set in between makes the transaction roll back and run again,
        durable."""
        durable = conn.execute(exists, params).fetchone() is not None
        try:
            with self._write(conn, durable=durable):
                result, deleted = body(conn)
                if deleted and not durable:
                    raise _NotDurable
            return result
        except _NotDurable:
            with self._write(conn, durable=True):
                return body(conn)[0]

    def purge(self, now: int | None, limit: int | None = None) -> int:
        t = self.table
        if limit is None:
            sql = f"DELETE FROM {t} WHERE expires <= {NOW}"
        else:
            sql = (
                f"DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE expires <= {NOW} "
                "ORDER BY expires LIMIT :limit)"
            )
        params = {"now": now, "limit": limit}
        return int(self.run(lambda conn: conn.execute(sql, params).rowcount))

    def reclaim_stamps(self, age_ms: int) -> int:
        hashes = f"length(key) = {HASH_BYTES}"

        def op(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                (newest,) = conn.execute(
                    f"SELECT max(stamp) FROM {self.stamps} WHERE {hashes} "
                    f"AND stamp < {NOW_US} - :age", {"age": age_ms * 1000},
                ).fetchone()
                if newest is None:
                    return 0
                conn.execute(
                    f"UPDATE {self.stamps} SET stamp = max(stamp, ?) WHERE key = ?",
                    (newest, FLOOR),
                )
                cur = conn.execute(
                    f"DELETE FROM {self.stamps} WHERE {hashes} AND stamp <= ?", (newest,)
                )
                return int(cur.rowcount)

        return int(self.run(op))

    def delete_keys(self, keys: list[bytes]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            with self._write(conn):
                cur = conn.executemany(
                    f"DELETE FROM {self.table} WHERE key = ?", [(k,) for k in keys]
                )
                return int(cur.rowcount)

        return self.run(op)

    # -- figures and integrity -----------------------------------------------------------

    def counts(self, now: int | None) -> dict[str, Any]:
        sql = (
            f"SELECT coalesce(sum(expires > {NOW}), 0), coalesce(sum(expires <= {NOW}), 0), "
            f"count(DISTINCT CASE WHEN expires > {NOW} THEN owner END) FROM {self.table}"
        )

        leases = (
            f"SELECT count(*) FILTER (WHERE length(key) = {HASH_BYTES}), "
            f"coalesce(sum(stamp) FILTER (WHERE key = ?), 0) FROM {self.stamps}"
        )

        def op(conn: sqlite3.Connection) -> Any:
            row = conn.execute(sql, {"now": now}).fetchone()
            stamps = conn.execute(leases, (DROPS,)).fetchone()
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
            return row, stamps, mode

        (live, expired, users), (stamps, drops), mode = self.run(op)
        out: dict[str, Any] = {"entries": live, "expired": expired, "users": users,
                               "stamps": stamps, "lease_drops": drops,
                               "journal_mode": mode}
        if self.path is not None:
            out["path"] = self.path
            out["file_bytes"] = os.path.getsize(self.path)
        return out

    def rows(self, batch: int = 1000) -> Iterator[tuple[bytes, bytes | None, bytes]]:
        sql = f"SELECT key, owner, value FROM {self.table} WHERE key > ? ORDER BY key LIMIT ?"
        after = b""
        while True:
            def fetch(conn: Any, start: bytes = after) -> list[Any]:
                return list(conn.execute(sql, (start, batch)).fetchall())

            chunk = self.run(fetch)
            yield from chunk
            if len(chunk) < batch:
                return
            after = chunk[-1][0]

    def problems(self, shared_secret: bool) -> list[str]:
        def op(conn: sqlite3.Connection) -> Any:
            return (conn.execute("PRAGMA quick_check").fetchall(),
                    conn.execute("PRAGMA journal_mode").fetchone()[0])

        checked, mode = self.run(op)
        out = [f"sqlite quick_check: {row[0]}" for row in checked if row[0] != "ok"]
        if mode != "wal":
            out.append(f"journal mode is {mode!r}, not 'wal': readers wait for writers")
        if self.path is not None:
            mode_bits = stat.S_IMODE(os.stat(self.path).st_mode)
            if mode_bits & 0o022:
                out.append(f"{self.path} is writable by group or others (mode "
                           f"{mode_bits:o}): they can log anyone out, and replace sessions "
                           "if they can also read the secret")
            if shared_secret and mode_bits & 0o044:
                out.append(f"{self.path} is readable by group or others (mode "
                           f"{mode_bits:o}) and holds the shared secret: they can forge "
                           "sessions (chmod 600, or give every client secret=)")
        return out
