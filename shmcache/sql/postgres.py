"""The session table on PostgreSQL, the database that already spans the app's hosts.

Layer: the storage layer of the database backend (see ``store.py``); knows nothing of
tokens or sessions. The connections (pool, timeouts, fork safety, psycopg as an optional
extra) are ``pg_connections.py``; this module is the SQL.

- Every operation is one SQL statement, so one round trip and its own transaction: a
  client that dies between statements leaves no transaction open. A logout's ``DELETE``
  and its ``pg_notify`` are in the same statement: the notification goes out exactly when
  the delete commits, never for a delete that rolled back.
- ``UNLOGGED`` table by default: no WAL for sessions (cheaper writes), and a crash
  empties it, so after a crash every user re-validates and no logged-out session comes
  back. The meta table (the secret) is a normal, logged table.
- The clock: the server's ``statement_timestamp()`` in ms (one clock for every host),
  unless the cache was given ``clock=``. Lease stamps always use the server's clock.
- Leases: a set after a miss and every logout run as one call of a PL/pgSQL function
  (``pg_leases.py`` says why a plain statement is not enough); ``{t}_stamps`` is
  UNLOGGED with the sessions (a crash empties both, and voids every lease).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from . import pg_leases
from .pg_connections import POOL_MAX as POOL_MAX  # (tests bound the pool with it)
from .pg_connections import PostgresConnections
from .store import DROPS, FLOOR, HASH_BYTES, HEAD, Row, StaleFingerprint

NOW = ("COALESCE(%(now)s::bigint, "
       "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint)")


class PostgresStore(PostgresConnections):
    """The session table's SQL on PostgreSQL (see ``store.SqlStore``)."""

    def __init__(
        self,
        table: str,
        timeout: float,
        *,
        url: str | None = None,
        connect: Callable[[], Any] | None = None,
        unlogged: bool = True,
    ) -> None:
        super().__init__(table, timeout, url=url, connect=connect, unlogged=unlogged)
        self._set_fn = f"{table}_set_{pg_leases.VERSION}"
        self._void_fn = f"{table}_void_{pg_leases.VERSION}"

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
