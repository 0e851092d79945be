"""Every backend the suite measures, behind one interface.

A ``Store`` is the shared thing (a segment, a directory, a server); ``open()`` gives this
process a ``SessionCache`` on it. Parents create stores; children made with ``fork`` call
``open()`` themselves, the way a gunicorn worker attaches after the master forks it.
"""

from __future__ import annotations

import importlib.util
import itertools
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

from shmcache import InMemorySessionCache, SharedMemorySessionCache
from shmcache.shm import fast

from . import seed
from .adapters import (
    DiskcacheSessionCache,
    LmdbSessionCache,
    ManagerDictSessionCache,
    RedisAdapter,
)
from .pg_server import PostgresServer
from .redis_server import RedisServer

VALUE_SIZE = 256  # the value-mode segment: a pickled seed Session is about 150 bytes
CAPACITY = 65536  # the README's example capacity

_names = itertools.count()


def segment_name(tag: str) -> str:
    return f"shmcache-bench-{os.getpid()}-{tag}-{next(_names)}"


class Resources:
    """What stores share for one run: a temporary directory and, on demand, one
    redis-server (started once, stopped by ``close``)."""

    def __init__(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="shmcache-bench-")
        if os.geteuid() == 0:  # a PostgreSQL running as nobody must reach its socket dir
            os.chmod(self.tmpdir, 0o755)
        self._redis: RedisServer | None = None
        self._pg: PostgresServer | None = None
        self.pg_version = ""

    def redis_port(self) -> int:
        if self._redis is None:
            server = RedisServer(self.tmpdir)
            server.start()
            self._redis = server
        return self._redis.port

    def pg_url(self) -> str:
        if self._pg is None:
            server = PostgresServer(self.tmpdir)
            server.start()
            self._pg = server
            self.pg_version = server.version
        return self._pg.url

    def close(self) -> None:
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._pg is not None:
            self._pg.stop()
            self._pg = None
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class Store:
    """A backend's shared state; ``open`` may be called in any process forked from here."""

    shared = True  # a session set in one process is a hit in another
    impl = ""  # what actually answers the calls, for the JSON

    def open(self) -> Any:
        raise NotImplementedError

    def destroy(self) -> None:
        """Remove what ``__init__`` made (parent only)."""

    def before_fork(self) -> None:
        """Called before a child that will ``open()`` is forked."""


class InMemoryStore(Store):
    shared = False

    def __init__(self, verbatim_seed: bool = True) -> None:
        self._seed = verbatim_seed
        self.impl = ("bench.seed.InMemorySessionCache (the seed's, verbatim)" if verbatim_seed
                     else "shmcache.InMemorySessionCache")

    def open(self) -> Any:
        # One dict per process: the seed's design (and its logout bug).
        return seed.InMemorySessionCache() if self._seed else InMemorySessionCache()


class ShmStore(Store):
    """``pure=True``: every object of this store (and of the children that open it) runs the
    pure-Python code, beside the default (compiled, if built) stores in the same run."""

    def __init__(self, value_size: int, capacity: int = CAPACITY, pure: bool = False) -> None:
        self.pure = pure
        self.impl = (f"shmcache.SharedMemorySessionCache(value_size={value_size}), "
                     f"{'pure Python' if pure else fast.implementation()}")
        self.name = segment_name("v" if value_size else "h")
        self.capacity = capacity
        self.value_size = value_size
        # Hash-only: another process's get of a session set here is a miss (by design).
        self.shared = value_size > 0
        with self._implementation():
            self._creator = SharedMemorySessionCache.create(
                self.name, capacity=capacity, value_size=value_size
            )
        self._opened: list[SharedMemorySessionCache] = []
        self._pid = os.getpid()

    def _implementation(self) -> Any:
        return mock.patch.dict(os.environ, {fast.ENV: "1"} if self.pure else {})

    def open(self) -> SharedMemorySessionCache:
        with self._implementation():
            cache = SharedMemorySessionCache.attach(self.name)
        if os.getpid() == self._pid:
            self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()
        self._creator.unlink()
        self._creator.close()


class LmdbStore(Store):
    impl = "adapters.LmdbSessionCache (py-lmdb)"

    def __init__(self, res: Resources) -> None:
        self.path = tempfile.mkdtemp(prefix="lmdb-", dir=res.tmpdir)
        self._opened: list[LmdbSessionCache] = []

    def open(self) -> LmdbSessionCache:
        cache = LmdbSessionCache(self.path)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()

    def before_fork(self) -> None:
        # LMDB must not be used across fork, and py-lmdb refuses to open an environment
        # that the process (by inheritance) already has open: close ours first.
        self.destroy()
        self._opened.clear()


class DiskcacheStore(Store):
    impl = "adapters.DiskcacheSessionCache (diskcache.Cache)"

    def __init__(self, res: Resources) -> None:
        self.path = tempfile.mkdtemp(prefix="diskcache-", dir=res.tmpdir)
        self._opened: list[DiskcacheSessionCache] = []

    def open(self) -> DiskcacheSessionCache:
        cache = DiskcacheSessionCache(self.path)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()


class ManagerStore(Store):
    impl = "adapters.ManagerDictSessionCache (multiprocessing.Manager().dict())"

    def __init__(self) -> None:
        self._manager = multiprocessing.get_context("fork").Manager()
        self._proxy = self._manager.dict()

    def open(self) -> ManagerDictSessionCache:
        return ManagerDictSessionCache(self._proxy)

    def destroy(self) -> None:
        self._manager.shutdown()


def shmcache_redis(port: int) -> Any | None:
    """``shmcache.RedisSessionCache`` on the throwaway server, if the package has one
    (its constructor takes a URL); None otherwise, and the bench's own adapter stands in."""
    try:
        from shmcache import RedisSessionCache  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    return RedisSessionCache(f"redis://127.0.0.1:{port}/0")


class RedisStore(Store):
    def __init__(self, res: Resources) -> None:
        self.port = res.redis_port()
        probe = shmcache_redis(self.port)
        self.impl = (
            "shmcache.RedisSessionCache" if probe is not None
            else "adapters.RedisAdapter (redis-py; shmcache.RedisSessionCache not importable)"
        )
        self._opened: list[Any] = [] if probe is None else [probe]

    def open(self) -> Any:
        cache = shmcache_redis(self.port) or RedisAdapter(self.port)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            close = getattr(cache, "close", None)
            if close is not None:
                close()


class TieredStore(Store):
    """``shmcache.TieredSessionCache``: a value-mode segment in front of Redis."""

    impl = "shmcache.TieredSessionCache(SharedMemorySessionCache, RedisSessionCache)"

    def __init__(self, res: Resources) -> None:
        self.port = res.redis_port()
        self._shm = ShmStore(VALUE_SIZE)
        self._opened: list[Any] = []

    def open(self) -> Any:
        from shmcache import (  # type: ignore[attr-defined,unused-ignore]
            RedisSessionCache,
            TieredSessionCache,
        )

        remote = RedisSessionCache(f"redis://127.0.0.1:{self.port}/0")
        cache = TieredSessionCache(self._shm.open(), remote)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()
        self._shm.destroy()


class DatabaseStore(Store):
    """``shmcache.DatabaseSessionCache`` on a SQLite file in the run's directory, or on the
    run's PostgreSQL (one table per store); every process opens its own connections."""

    def __init__(self, res: Resources, dialect: str) -> None:
        table = f"bench_{next(_names)}"
        if dialect == "sqlite":
            self.url = f"sqlite:///{res.tmpdir}/{table}.db?table={table}"
        else:
            self.url = f"{res.pg_url()}&table={table}"
        self.impl = f"shmcache.DatabaseSessionCache ({dialect}, table {table})"
        self._opened: list[Any] = []

    def open(self) -> Any:
        from shmcache import open_cache

        cache = open_cache(self.url)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()
        self._opened.clear()

    def before_fork(self) -> None:
        self.destroy()  # not needed (children never use them), but frees the connections


class TieredPgStore(Store):
    """``shm+postgresql://``: a value-mode segment in front of the run's PostgreSQL."""

    impl = "shmcache.TieredSessionCache(SharedMemorySessionCache, DatabaseSessionCache)"

    def __init__(self, res: Resources) -> None:
        self._shm = ShmStore(VALUE_SIZE)
        self.url = (f"shm+{res.pg_url()}&table=bench_{next(_names)}&shm={self._shm.name}"
                    f"&value_size={VALUE_SIZE}")
        self._opened: list[Any] = []

    def open(self) -> Any:
        from shmcache import open_cache

        cache = open_cache(self.url)
        self._opened.append(cache)
        return cache

    def destroy(self) -> None:
        for cache in self._opened:
            cache.close()
        self._shm.destroy()


# Which code the default shared-memory rows run (the compiled core unless it is not built or
# SHMCACHE_PURE_PYTHON is set): said in their labels, beside the pure-Python rows.
_IMPL = ", compiled" if fast.implementation() == "c" else ", pure Python"


def _compiled_missing() -> str | None:
    if fast.implementation() != "c":
        return "the default shmcache rows run pure Python already (" + (
            f"{fast.ENV} is set)" if fast.pure_python_forced() else f"{fast.UNAVAILABLE})")
    return None


def _database_missing() -> str | None:
    import shmcache

    if not hasattr(shmcache, "DatabaseSessionCache"):
        return "this shmcache has no DatabaseSessionCache"
    return None


def _postgres_missing() -> str | None:
    return _database_missing() or PostgresServer.missing()


def _tiered_missing() -> str | None:
    import shmcache

    if not hasattr(shmcache, "TieredSessionCache"):
        return "this shmcache has no TieredSessionCache"
    return _redis_missing()


def _module_missing(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"python package {module!r} not installed (pip install -e '.[bench]')"
    return None


def _redis_missing() -> str | None:
    return _module_missing("redis") or RedisServer.missing()


@dataclass(frozen=True)
class Backend:
    key: str
    label: str
    make: Callable[[Resources], Store]
    missing: Callable[[], str | None] = lambda: None


BACKENDS: tuple[Backend, ...] = (
    Backend("inmemory", "InMemorySessionCache (seed)", lambda r: InMemoryStore()),
    Backend("inmemory-pkg", "shmcache.InMemorySessionCache", lambda r: InMemoryStore(False)),
    Backend("shm", f"shmcache, hash-only{_IMPL}", lambda r: ShmStore(0)),
    Backend("shm-value", f"shmcache, value_size={VALUE_SIZE}{_IMPL}",
            lambda r: ShmStore(VALUE_SIZE)),
    # Issue 15: the pure-Python reference beside the compiled core, same run.
    Backend("shm-py", "shmcache, hash-only, pure Python", lambda r: ShmStore(0, pure=True),
            _compiled_missing),
    Backend("shm-value-py", f"shmcache, value_size={VALUE_SIZE}, pure Python",
            lambda r: ShmStore(VALUE_SIZE, pure=True), _compiled_missing),
    Backend("lmdb", "LMDB (py-lmdb)", LmdbStore, lambda: _module_missing("lmdb")),
    Backend("diskcache", "diskcache", DiskcacheStore, lambda: _module_missing("diskcache")),
    Backend("manager", "Manager().dict()", lambda r: ManagerStore()),
    Backend("redis", "Redis (loopback)", RedisStore, _redis_missing),
    Backend("tiered", f"Tiered (shm value_size={VALUE_SIZE} + Redis)", TieredStore,
            _tiered_missing),
    Backend("sqlite", "SQLite (WAL file)", lambda r: DatabaseStore(r, "sqlite"),
            _database_missing),
    Backend("postgresql", "PostgreSQL (unix socket)", lambda r: DatabaseStore(r, "postgresql"),
            _postgres_missing),
    Backend("tiered-pg", f"Tiered (shm value_size={VALUE_SIZE} + PostgreSQL)", TieredPgStore,
            _postgres_missing),
)
BY_KEY = {b.key: b for b in BACKENDS}


def available(
    keys: tuple[str, ...] | None, note: Callable[[str], None]
) -> list[Backend]:
    """The backends to run (all when ``keys`` is None), saying why each missing one is
    skipped."""
    chosen = [b for b in BACKENDS if keys is None or b.key in keys]
    out = []
    for backend in chosen:
        reason = backend.missing()
        if reason is None:
            out.append(backend)
        else:
            note(f"skipped {backend.label}: {reason}")
    return out
