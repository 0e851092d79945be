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
  unless the cache was given ``clock=``.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .._errors import InvalidArgument, InvalidType
from .store import _INHERITED, LocalPool, SqlStore, StaleFingerprint

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
        try:
            with self._pool.connection(timeout=self.timeout) as conn:
                yield conn
        except self._pool_timeout as exc:
            # The pool says only that it waited; the reason is the last connect error.
            raise self._pool_timeout(f"{exc} (last attempt: {self._connect_error})") from exc

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
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
            (t, self.meta),
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

    def is_missing_table(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UndefinedTable)

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

    def lookup(
        self, key: bytes, fp: bytes, now: int | None
    ) -> tuple[bytes, bytes | None, int] | None:
        sql = (
            f"SELECT m.fingerprint, s.value, s.owner, s.expires - {NOW} FROM {self.meta} m "
            f"LEFT JOIN {self.table} s ON s.key = %(key)s AND s.expires > {NOW} "
            "WHERE m.id = 1"
        )
        row = self.run(lambda conn: conn.execute(sql, {"key": key, "now": now}).fetchone())
        if row is None or row[0] != fp:
            raise StaleFingerprint
        return None if row[1] is None else (row[1], row[2], row[3])

    def store(
        self, key: bytes, owner: bytes | None, value: bytes, ttl_ms: int, fp: bytes,
        now: int | None,
    ) -> None:
        sql = (
            f"INSERT INTO {self.table} (key, owner, expires, value) "
            f"SELECT %(key)s, %(owner)s, {NOW} + %(ttl)s, %(value)s FROM {self.meta} "
            "WHERE id = 1 AND fingerprint = %(fp)s "
            "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, "
            "expires = excluded.expires, value = excluded.value RETURNING 1"
        )
        params = {"key": key, "owner": owner, "ttl": ttl_ms, "value": value, "fp": fp,
                  "now": now}
        if self.run(lambda conn: conn.execute(sql, params).fetchone()) is None:
            raise StaleFingerprint

    def _delete_and_notify(
        self, where: str, params: dict[str, Any], now: int | None, admin: bool = False
    ) -> int:
        """``DELETE ... WHERE {where}`` and ``pg_notify`` in one statement, both only if
        the meta row holds ``params["fp"]``; returns how many deleted rows were live."""
        # No FOR SHARE on the meta row: if the secret is replaced while this runs, every
        # row under the old one is unreachable anyway, deleted or not.
        sql = (
            f"WITH m AS (SELECT fingerprint FROM {self.meta} WHERE id = 1), "
            f"d AS (DELETE FROM {self.table} WHERE {where} "
            "AND (SELECT fingerprint FROM m) = %(fp)s RETURNING expires) "
            "SELECT (SELECT fingerprint FROM m), "
            f"(SELECT count(*) FROM d WHERE expires > {NOW}), "
            "(SELECT pg_notify(%(channel)s, %(message)s)::text FROM m "
            "WHERE fingerprint = %(fp)s)"
        )
        params = {**params, "channel": self.channel, "now": now}

        def op(conn: Any) -> Any:
            if not admin:
                return conn.execute(sql, params).fetchone()
            with self._admin(conn):
                return conn.execute(sql, params).fetchone()

        row = self.run(op)
        if row[0] != params["fp"]:
            raise StaleFingerprint
        return int(row[1])

    def remove(self, key: bytes, fp: bytes, message: str) -> None:
        self._delete_and_notify(
            "key = %(key)s", {"key": key, "fp": fp, "message": message}, None
        )

    def revoke(self, owner: bytes, fp: bytes, now: int | None, message: str) -> int:
        return self._delete_and_notify(
            "owner = %(owner)s", {"owner": owner, "fp": fp, "message": message}, now
        )

    def clear(self, fp: bytes, message: str) -> None:
        self._delete_and_notify("TRUE", {"fp": fp, "message": message}, None, admin=True)

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
            f"current_setting('server_version') FROM {self.table}"
        )

        def op(conn: Any) -> Any:
            with self._admin(conn):
                return conn.execute(sql, {"now": now, "t": self.table}).fetchone()

        live, expired, users, unlogged, version = self.run(op)
        return {"entries": live, "expired": expired, "users": users, "unlogged": unlogged,
                "server_version": version}

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
        """The tiered cache's heartbeat: a round trip on the LISTEN connection (a closed
        one raises), answered like redis-py's PubSub answers PING, with a "pong" message."""
        if self._conn is not None:
            self._conn.execute("SELECT 1")
            self._pending.append({"type": "pong", "channel": None, "data": b""})

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
