"""Connections to PostgreSQL: per process, pooled, configured, retried once after a restart.

Layer: the storage layer of the database backend: the connection half of ``PostgresStore``
(``postgres.py`` holds the SQL). psycopg 3 and psycopg_pool are an optional extra
(``pip install 'shmcache[postgresql]'``), imported when a store is made.

- Connections are per process: a ``psycopg_pool.ConnectionPool`` made at the first call
  in each process (after a fork, the child makes its own and never touches the parent's),
  or, with ``connect=``, connections from your callable. Threads share the pool.
- ``timeout`` bounds the wait for a connection (and the connect itself) and is the
  server-side ``statement_timeout`` and ``lock_timeout`` of each statement; statements
  that touch the whole table (``clear``, ``purge``, ``check``, ``stats``) may run for
  ``max(timeout, 60 s)``, but wait for a lock no longer than ``timeout`` either.
  A pooled connection that the server closed (a restart) fails once and is replaced: the
  call is retried once on a fresh connection.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .._errors import InvalidArgument, InvalidType
from .listener import Listener
from .store import _INHERITED, LocalPool, SqlStore

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


class PostgresConnections(SqlStore):
    """This process's connections to one database (``PostgresStore`` runs its SQL)."""

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

    def listen(self) -> Listener:
        def connect() -> Any:
            if self._connect is None:
                return self._psycopg.connect(self._url, **self._kwargs)
            conn = self._open()
            if not callable(getattr(conn, "notifies", None)):
                raise InvalidType("LISTEN needs a psycopg 3 connection from connect=")
            return conn

        return Listener(connect)
