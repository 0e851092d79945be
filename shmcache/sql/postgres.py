"""The session table on PostgreSQL, the database that already spans the app's hosts.

Layer: the storage layer of the database backend (see ``store.py``); knows nothing of
tokens or sessions. psycopg 3 and psycopg_pool are an optional extra
(``pip install 'shmcache[postgresql]'``), imported when a store is made.

- Every operation is one SQL statement, so one round trip and its own transaction: a
  client that dies between statements leaves no transaction open. A logout's ``DELETE``
  and its ``pg_notify`` are in the same statement: the notification goes out exactly when
  the delete commits, never for a delete that rolled back.
- ``UNLOGGED`` table by default: no WAL for sessions (cheaper writes), and a crash
  empties it, so after a crash every user re-validates and no logged-out session comes
  back. The meta table (the secret) is a normal, logged table.
- Connections are per process: a ``psycopg_pool.ConnectionPool`` made at the first call
  in each process (after a fork, the child makes its own and never touches the parent's),
  or, with ``connect=``, connections from your callable. Threads share the pool.
- ``timeout`` bounds the wait for a connection (and the connect itself) and is the
  server-side ``statement_timeout`` and ``lock_timeout`` of each statement; statements
  that touch the whole table (``clear``, ``purge``, ``check``, ``stats``) may run for
  ``max(timeout, 60 s)``, but wait for a lock no longer than ``timeout`` either.
  A pooled connection that the server closed (a restart) fails once and is replaced: the
  call is retried once on a fresh connection.
- The clock: the server's ``statement_timestamp()`` in ms (one clock for every host),
  unless the cache was given ``clock=``. Lease stamps always use the server's clock.
- Leases: a set after a miss and every logout run as one call of a PL/pgSQL function
  (``pg_leases.py`` says why a plain statement is not enough); ``{t}_stamps`` is
  UNLOGGED with the sessions (a crash empties both, and voids every lease).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .._errors import InvalidArgument, InvalidType
from . import pg_leases
from .listener import Listener
from .store import (
    _INHERITED,
    DROPS,
    FLOOR,
    HASH_BYTES,
    HEAD,
    LocalPool,
    Row,
    SqlStore,
    StaleFingerprint,
)

NOW = ("COALESCE(%(now)s::bigint, "
       "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint)")
ADMIN_TIMEOUT = 60.0  # seconds at least, for statements that touch the whole table
POOL_MAX = 10  # connections per process at most (threads beyond that wait for one)


def import_psycopg() -> ModuleType:
    """The psycopg (3) package, or an ``ImportError`` that says how to get it."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "the PostgreSQL backend needs psycopg 3 and psycopg_pool: "
            "pip install 'shmcache[postgresql]'"
        ) from exc
    return psycopg


def conninfo_params(url: str) -> dict[str, Any]:
    """libpq's reading of ``url`` (``InvalidArgument`` naming what it refuses)."""
    psycopg = import_psycopg()
    from .urls import redact

    try:
        return dict(psycopg.conninfo.conninfo_to_dict(url))
    except psycopg.Error as exc:
        raise InvalidArgument(f"bad PostgreSQL URL {redact(url)!r}: {exc}") from None


class PostgresStore(SqlStore):
    dialect = "postgresql"

    def __init__(
        self,
        table: str,
        timeout: float,
        *,
        url: str | None = None,
        connect: Callable[[], Any] | None = None,
        unlogged: bool = True,
    ) -> None:
        super().__init__(table, timeout)
        self._psycopg = import_psycopg()
        self.errors = (self._psycopg.Error, OSError)
        self._url = url
        self._connect = connect
        self.unlogged = unlogged
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if url is not None:
            given = conninfo_params(url)
            # libpq waits for ever by default, and counts whole seconds (2 at least).
            if "connect_timeout" not in given:
                self._kwargs["connect_timeout"] = max(2, math.ceil(timeout))
            if "application_name" not in given:
                self._kwargs["application_name"] = "shmcache"
        self._pool: Any = None
        self._pool_timeout: type[Exception] = Exception  # psycopg_pool.PoolTimeout, once imported
        self._connect_error: BaseException | None = None
        self._local: LocalPool[Any] | None = None
        self._set_fn = f"{table}_set_{pg_leases.VERSION}"
        self._void_fn = f"{table}_void_{pg_leases.VERSION}"

    # -- connections ---------------------------------------------------------------------

    def _configure(self, conn: Any) -> None:
        ms = str(max(1, round(self.timeout * 1000)))
        conn.execute(
            "SELECT set_config('statement_timeout', %s, false), "
            "set_config('lock_timeout', %s, false)",
            (ms, ms),
        )

    def _open(self) -> Any:
        """A new connection of ours: autocommit, statement_timeout set."""
        if self._connect is not None:
            conn = self._connect()
            if not isinstance(conn, self._psycopg.Connection):
                with contextlib.suppress(Exception):
                    conn.close()
                raise InvalidType(
                    "connect= must return a psycopg 3 connection for dialect 'postgresql', "
                    f"got {type(conn).__name__}"
                )
            conn.autocommit = True
        else:
            conn = self._psycopg.connect(self._url, **self._kwargs)
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        if self._connect is not None:
            if self._local is None:
                self._local = LocalPool(self._open, lambda conn: conn.close())
            with self._local.connection() as conn:
                yield conn
            return
        if self._pool is None:
            self._pool = self._new_pool()
        pool = self._pool
        try:
            conn = pool.getconn(timeout=self.timeout)
        except self._pool_timeout as exc:
            # The pool says only that it waited; the reason is the last connect error.
            raise self._pool_timeout(f"{exc} (last attempt: {self._connect_error})") from exc
        # getconn/putconn, not pool.connection(): its "with conn" adds a commit per call,
        # and every statement here is its own transaction already (autocommit).
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _new_pool(self) -> Any:
        from psycopg_pool import ConnectionPool, PoolTimeout

        store = self
        self._pool_timeout = PoolTimeout

        class Connection(self._psycopg.Connection):  # type: ignore[misc,name-defined]
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().connect(*args, **kwargs)
                except Exception as exc:
                    store._connect_error = exc
                    raise

        # reconnect_timeout: after failing for that long the pool stops retrying in the
        # background, and the next call that needs a connection tries again at once (its
        # default, 5 minutes of exponential backoff, would keep a restarted server unused
        # for up to minutes).
        return ConnectionPool(
            self._url or "", connection_class=Connection, kwargs=self._kwargs,
            min_size=1, max_size=POOL_MAX, timeout=self.timeout,
            reconnect_timeout=max(self.timeout, 1.0), configure=self._configure,
            open=True, num_workers=1, name=f"shmcache-{self.table}",
        )

    def _with_connection(self, fn: Callable[[Any], Any]) -> Any:
        for attempt in range(2):
            used: list[Any] = []
            try:
                with self._connection() as conn:
                    used.append(conn)
                    return fn(conn)
            except self._psycopg.OperationalError:
                # A pooled connection the server has closed since (a restart) fails once:
                # the pool drops it, checks the others it holds (as old as this one), and
                # the call runs again on a fresh one. Every operation is one idempotent
                # statement, so running it twice is safe.
                if attempt or not used or not used[0].broken:
                    raise
                if self._pool is not None:
                    self._pool.check()
        raise AssertionError("unreachable")

    def forget_connections(self) -> None:
        _INHERITED.append(self._pool)
        self._pool = None
        if self._local is not None:
            self._local.abandon()
            self._local = None

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        if self._local is not None:
            self._local.close()
            self._local = None

    @contextlib.contextmanager
    def _admin(self, conn: Any) -> Iterator[None]:
        """A transaction whose statements may take ``max(timeout, ADMIN_TIMEOUT)``, but
        wait no longer than ``timeout`` for a lock (``lock_timeout``)."""
        ms = round(max(self.timeout, ADMIN_TIMEOUT) * 1000)
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(ms),))
            yield

    def describe(self) -> str:
        from .urls import redact

        return redact(self._url) if self._url else "postgresql (connect=)"

    # -- schema and meta -----------------------------------------------------------------

    def create_schema(self, conn: Any) -> None:
        t = self.table
        kind = "UNLOGGED TABLE" if self.unlogged else "TABLE"
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL "
            "AND to_regclass(%s) IS NOT NULL AND to_regproc(%s) IS NOT NULL "
            "AND to_regproc(%s) IS NOT NULL",
            (t, self.meta, self.stamps, self._set_fn, self._void_fn),
        ).fetchone()
        if found[0]:
            return  # no DDL, so no lock: a process starting while the table is busy starts
        with conn.transaction():
            # CREATE ... IF NOT EXISTS races with itself (a unique violation in pg_type):
            # processes starting together take turns.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("shmcache:" + t,))
            conn.execute(
                f"CREATE {kind} IF NOT EXISTS {t} (key bytea PRIMARY KEY, owner bytea, "
                "expires bigint NOT NULL, value bytea NOT NULL)"
            )
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {t}_owner ON {t} (owner) WHERE owner IS NOT NULL"
            )
            conn.execute(f"CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires)")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.meta} (id integer PRIMARY KEY "
                "CHECK (id = 1), secret bytea, fingerprint bytea NOT NULL)"
            )
            conn.execute(
                f"CREATE {kind} IF NOT EXISTS {self.stamps} (key bytea PRIMARY KEY, "
                "stamp bigint NOT NULL)"
            )
            conn.execute(pg_leases.restart_stamps(self.stamps))
            conn.execute(pg_leases.set_function(t, self.meta, self.stamps))
            conn.execute(pg_leases.void_function(t, self.meta, self.stamps))

    def is_missing_table(self, exc: BaseException) -> bool:
        errors = self._psycopg.errors
        return isinstance(exc, (errors.UndefinedTable, errors.UndefinedFunction))

    def read_meta(self) -> tuple[bytes | None, bytes] | None:
        sql = f"SELECT secret, fingerprint FROM {self.meta} WHERE id = 1"
        row = self.run(lambda conn: conn.execute(sql).fetchone())
        return None if row is None else (row[0], row[1])

    def create_meta(self, secret: bytes | None, fp: bytes) -> tuple[bytes | None, bytes]:
        sql = (
            f"WITH i AS (INSERT INTO {self.meta} (id, secret, fingerprint) "
            "VALUES (1, %(secret)s, %(fp)s) ON CONFLICT (id) DO NOTHING RETURNING 1) "
            "SELECT (SELECT pg_notify(%(channel)s, 'c')::text FROM i)"
        )
        params = {"secret": secret, "fp": fp, "channel": self.channel}
        self.run(lambda conn: conn.execute(sql, params).fetchone())
        row = self.read_meta()
        if row is None:  # deleted again in between: someone is fighting us
            raise self._psycopg.OperationalError(f"{self.meta} row vanished as it was made")
        return row

    # -- sessions ------------------------------------------------------------------------

    def lookup(self, key: bytes, fp: bytes, now: int | None) -> tuple[Row | None, int | None]:
        sql = (
            f"SELECT m.fingerprint, s.value, s.owner, s.expires - {NOW}, "
            f"(SELECT h.stamp FROM {self.stamps} h, {self.stamps} f "
            "WHERE h.key = %(head)s AND f.key = %(floor)s) "
            f"FROM {self.meta} m LEFT JOIN {self.table} s ON s.key = %(key)s "
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
        params = {"key": key, "owner": owner, "ttl": ttl_ms, "value": value, "fp": fp,
                  "now": now, "lease": lease, "channel": self.channel}
        if lease is not None:
            sql = (f"SELECT {self._set_fn}(%(key)s::bytea, %(owner)s::bytea, "
                   "%(value)s::bytea, %(ttl)s::bigint, %(fp)s::bytea, %(now)s::bigint, "
                   "%(lease)s::bigint, %(channel)s::text)")
            (done,) = self.run(lambda conn: conn.execute(sql, params).fetchone())
            if done < 0:
                raise StaleFingerprint
            return bool(done)
        sql = (
            f"INSERT INTO {self.table} (key, owner, expires, value) "
            f"SELECT %(key)s, %(owner)s, {NOW} + %(ttl)s, %(value)s FROM {self.meta} "
            "WHERE id = 1 AND fingerprint = %(fp)s "
            "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
            "expires = excluded.expires, value = excluded.value RETURNING 1"
        )
        if self.run(lambda conn: conn.execute(sql, params).fetchone()) is None:
            raise StaleFingerprint
        return True

    def drop(self, key: bytes, fp: bytes) -> None:
        sql = (
            f"WITH m AS (SELECT fingerprint FROM {self.meta} WHERE id = 1), "
            f"d AS (DELETE FROM {self.table} WHERE key = %(key)s "
            "AND (SELECT fingerprint FROM m) = %(fp)s RETURNING 1), "
            f"c AS (UPDATE {self.stamps} SET stamp = stamp + 1 WHERE key = %(drops)s "
            "AND (SELECT fingerprint FROM m) = %(fp)s) "
            "SELECT (SELECT fingerprint FROM m), "
            "(SELECT pg_notify(%(channel)s, %(message)s)::text FROM d LIMIT 1)"
        )
        params = {"key": key, "fp": fp, "drops": DROPS, "channel": self.channel,
                  "message": "i:" + key.hex()}
        if self.run(lambda conn: conn.execute(sql, params).fetchone())[0] != fp:
            raise StaleFingerprint

    def restart_stamps(self) -> None:
        sql = pg_leases.restart_stamps(self.stamps)
        self.run(lambda conn: conn.execute(sql))

    def _void(
        self, key: bytes | None, owner: bytes | None, fp: bytes, now: int | None,
        message: str, admin: bool = False,
    ) -> int:
        """Delete the rows of ``key``, of ``owner`` or (neither) all, stamp them, and
        ``pg_notify``, in one call of ``{t}_void_v1``, only if the meta row holds ``fp``;
        returns how many deleted rows were live."""
        # No FOR SHARE on the meta row: if the secret is replaced while this runs, every
        # row under the old one is unreachable anyway, deleted or not.
        sql = (f"SELECT * FROM {self._void_fn}(%(key)s::bytea, %(owner)s::bytea, "
               "%(fp)s::bytea, %(now)s::bigint, %(channel)s::text, %(message)s::text)")
        params = {"key": key, "owner": owner, "fp": fp, "now": now,
                  "channel": self.channel, "message": message}

        def op(conn: Any) -> Any:
            if not admin:
                return conn.execute(sql, params).fetchone()
            with self._admin(conn):
                return conn.execute(sql, params).fetchone()

        found, live = self.run(op)
        if found != fp:
            raise StaleFingerprint
        return int(live)

    def remove(self, key: bytes, fp: bytes, message: str) -> None:
        self._void(key, None, fp, None, message)

    def revoke(self, owner: bytes, fp: bytes, now: int | None, message: str) -> int:
        return self._void(None, owner, fp, now, message)

    def clear(self, fp: bytes, message: str) -> None:
        self._void(None, None, fp, None, message, admin=True)

    def reclaim_stamps(self, age_ms: int) -> int:
        sql = pg_leases.reclaim_stamps(self.stamps)
        return int(self.run(lambda conn: conn.execute(sql, {"age": age_ms * 1000})
                            .fetchone()[0]))

    def purge(self, now: int | None, limit: int | None = None) -> int:
        t = self.table
        if limit is None:
            def op(conn: Any) -> int:
                with self._admin(conn):
                    cur = conn.execute(f"DELETE FROM {t} WHERE expires <= {NOW}", {"now": now})
                    return int(cur.rowcount)

            return int(self.run(op))
        # SKIP LOCKED: processes reclaiming at the same moment take different rows.
        sql = (
            f"DELETE FROM {t} WHERE key IN (SELECT key FROM {t} WHERE expires <= {NOW} "
            "ORDER BY expires LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        )
        return int(self.run(lambda conn: conn.execute(sql, {"now": now, "limit": limit})
                            .rowcount))

    def delete_keys(self, keys: list[bytes]) -> int:
        sql = f"DELETE FROM {self.table} WHERE key = ANY(%(keys)s)"
        return int(self.run(lambda conn: conn.execute(sql, {"keys": keys}).rowcount))

    # -- figures and integrity -----------------------------------------------------------

    def counts(self, now: int | None) -> dict[str, Any]:
        sql = (
            f"SELECT count(*) FILTER (WHERE expires > {NOW}), "
            f"count(*) FILTER (WHERE expires <= {NOW}), "
            f"count(DISTINCT owner) FILTER (WHERE expires > {NOW}), "
            "(SELECT relpersistence = 'u' FROM pg_class WHERE oid = to_regclass(%(t)s)), "
            f"current_setting('server_version'), "
            f"(SELECT count(*) FROM {self.stamps} WHERE length(key) = {HASH_BYTES}), "
            f"(SELECT stamp FROM {self.stamps} WHERE key = %(drops)s) FROM {self.table}"
        )

        def op(conn: Any) -> Any:
            with self._admin(conn):
                return conn.execute(sql, {"now": now, "t": self.table, "drops": DROPS}
                                    ).fetchone()

        live, expired, users, unlogged, version, stamps, drops = self.run(op)
        return {"entries": live, "expired": expired, "users": users, "unlogged": unlogged,
                "server_version": version, "stamps": stamps, "lease_drops": drops or 0}

    def rows(self, batch: int = 1000) -> Iterator[tuple[bytes, bytes | None, bytes]]:
        sql = (f"SELECT key, owner, value FROM {self.table} WHERE key > %s "
               "ORDER BY key LIMIT %s")
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
        return []

    def listen(self) -> Listener:
        def connect() -> Any:
            if self._connect is None:
                return self._psycopg.connect(self._url, **self._kwargs)
            conn = self._open()
            if not callable(getattr(conn, "notifies", None)):
                raise InvalidType("LISTEN needs a psycopg 3 connection from connect=")
            return conn

        return Listener(connect)
