"""The end-to-end benchmark's app: one authenticated endpoint, the seed app's auth pattern.

``GET /me`` with ``Authorization: Bearer <token>``: ``cache.get(token)``; on a miss the
token is validated (its HMAC checked, a session built: a stand-in for the database, kept
cheap so that the figures compare the caches, not a database) and ``cache.set``. The cache
is chosen by ``BENCH_BACKEND``; shmcache comes through its public gunicorn integration
(``shmcache.gunicorn.get_cache``), or by name if that module is absent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from bench.auth import validate

SECRET = os.environ.get("BENCH_SECRET", "bench-secret").encode()
TTL = float(os.environ.get("BENCH_TTL", "60"))


def _make_cache() -> Any:
    backend = os.environ.get("BENCH_BACKEND", "inmemory")
    if backend == "inmemory":
        from bench.seed import InMemorySessionCache

        return InMemorySessionCache()
    if backend in ("shm", "shm-value"):
        try:
            from shmcache.gunicorn import get_cache
        except ImportError:
            from shmcache import SharedMemorySessionCache

            return SharedMemorySessionCache.attach(os.environ["SHMCACHE_NAME"])
        return get_cache()
    if backend == "redis":
        from bench.adapters import RedisAdapter
        from bench.backends import shmcache_redis

        port = int(os.environ["BENCH_REDIS_PORT"])
        return shmcache_redis(port) or RedisAdapter(port)
    if backend in ("sqlite", "postgresql"):
        from shmcache import open_cache

        return open_cache(os.environ["BENCH_DB_URL"])
    raise ValueError(f"unknown BENCH_BACKEND {backend!r}")


cache = _make_cache()
_counts = {"hits": 0, "misses": 0}  # this worker's, for the driver's hit rate


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/health":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"pid": os.getpid(), **_counts}).encode()]
    auth = environ.get("HTTP_AUTHORIZATION", "")
    token = auth[7:] if auth.startswith("Bearer ") else ""
    session = cache.get(token) if token else None
    _counts["misses" if session is None else "hits"] += 1
    if session is None and token:
        session = validate(token, SECRET)
        if session is not None:
            cache.set(token, session, TTL)
    if session is None:
        start_response("401 Unauthorized", [("Content-Type", "application/json")])
        return [b'{"detail": "not authenticated"}']
    body = json.dumps({"user": session["id"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
