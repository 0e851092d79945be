"""The peers a user would pick instead of shmcache, each behind the seed's ``SessionCache``
calls, so every backend does the same work per call: look the token up, honour the TTL,
hand back a session object.

Settings are the ones a user would choose for a cache (not for a database of record): LMDB
without fsync, diskcache with its defaults, Redis without persistence.
"""

from __future__ import annotations

import pickle
import struct
import time
from typing import Any

_EXPIRY = struct.Struct("<d")  # CLOCK_MONOTONIC seconds: one clock for every process


class LmdbSessionCache:
    """py-lmdb: expiry (8 bytes) + pickled session per key, one read transaction per get."""

    def __init__(self, path: str) -> None:
        import lmdb

        # sync/metasync off: a cache need not survive a power cut; writemap: fewer copies.
        self._env = lmdb.open(
            path, map_size=1 << 30, sync=False, metasync=False, writemap=True,
            max_readers=256, readahead=False,
        )

    def get(self, token: str) -> Any | None:
        with self._env.begin() as txn:
            raw = txn.get(token.encode())
        if raw is None or time.monotonic() >= _EXPIRY.unpack_from(raw)[0]:
            return None
        return pickle.loads(raw[8:])

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        raw = _EXPIRY.pack(time.monotonic() + ttl_seconds) + pickle.dumps(session)
        with self._env.begin(write=True) as txn:
            txn.put(token.encode(), raw)

    def invalidate(self, token: str) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(token.encode())

    def clear(self) -> None:
        with self._env.begin(write=True) as txn:
            txn.drop(self._env.open_db(), delete=False)

    def close(self) -> None:
        self._env.close()


class DiskcacheSessionCache:
    """diskcache.Cache (SQLite + files) with its own expiry."""

    def __init__(self, path: str) -> None:
        import diskcache

        self._cache = diskcache.Cache(path)

    def get(self, token: str) -> Any | None:
        return self._cache.get(token)

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        self._cache.set(token, session, expire=ttl_seconds)

    def invalidate(self, token: str) -> None:
        self._cache.delete(token)

    def clear(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.close()


class ManagerDictSessionCache:
    """A ``multiprocessing.Manager().dict()`` proxy: every call is a round trip to the
    manager process."""

    def __init__(self, proxy: Any) -> None:
        self._d = proxy

    def get(self, token: str) -> Any | None:
        entry = self._d.get(token)
        if entry is None or time.monotonic() >= entry[1]:
            return None
        return entry[0]

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        self._d[token] = (session, time.monotonic() + ttl_seconds)

    def invalidate(self, token: str) -> None:
        self._d.pop(token, None)

    def clear(self) -> None:
        self._d.clear()

    def close(self) -> None:
        pass


class RedisAdapter:
    """redis-py on loopback, for when ``shmcache.RedisSessionCache`` is not importable:
    GET / SET PX / DEL of a pickled session under a key prefix."""

    def __init__(self, port: int, prefix: str = "bench:session:") -> None:
        import redis

        self._r = redis.Redis(host="127.0.0.1", port=port)
        self._prefix = prefix

    def get(self, token: str) -> Any | None:
        raw: bytes | None = self._r.get(self._prefix + token)  # type: ignore[assignment]
        return None if raw is None else pickle.loads(raw)

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        px = max(1, round(ttl_seconds * 1000))
        self._r.set(self._prefix + token, pickle.dumps(session), px=px)

    def invalidate(self, token: str) -> None:
        self._r.delete(self._prefix + token)

    def clear(self) -> None:
        self._r.flushdb()  # the bench's own throwaway server: nothing else lives there

    def close(self) -> None:
        self._r.close()
