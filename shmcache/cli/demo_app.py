"""A small login/logout WSGI app, the shape of the seed's FastAPI back end, for the demo.

Sessions live in a SQLite database (``SHMCACHE_DEMO_DB``); the auth check asks the session
cache first and, on a miss, validates against the database and caches the result, exactly
like the seed's auth dependency. ``SHMCACHE_DEMO_BACKEND`` picks the cache: ``memory`` (the
seed's per-process dict) or ``shm`` (shmcache, through ``shmcache.gunicorn.get_cache``).

Run it: ``gunicorn -c gunicorn.conf.py shmcache.cli.demo_app:app``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

from .._protocol import SessionCache
from ..memory import InMemorySessionCache

TTL_SECONDS = 60.0
StartResponse = Callable[[str, list[tuple[str, str]]], Any]

_cache: SessionCache | None = None


def cache() -> SessionCache:
    """Built lazily, in the worker: with ``preload_app`` the module is imported in the master."""
    global _cache
    if _cache is None:
        if os.environ.get("SHMCACHE_DEMO_BACKEND", "shm") == "memory":
            _cache = InMemorySessionCache()
        else:
            from ..gunicorn import get_cache

            _cache = get_cache()
    return _cache


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(os.environ["SHMCACHE_DEMO_DB"], timeout=30, isolation_level=None)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS sessions (token TEXT PRIMARY KEY, user TEXT, created REAL)"
    )
    return conn


def _json(start: StartResponse, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps({**body, "worker": os.getpid()}).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def _token(environ: dict[str, Any]) -> str:
    auth = environ.get("HTTP_AUTHORIZATION", "")
    return auth[7:] if auth.startswith("Bearer ") else ""


def app(environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
    path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
    if path == "/login" and method == "POST":
        token = secrets.token_urlsafe(32)
        with _db() as db:
            db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (token, "alice", time.time()))
        return _json(start, "200 OK", {"token": token})
    if path == "/me":
        token = _token(environ)
        session = cache().get(token) if token else None
        if session is not None:
            return _json(start, "200 OK", {"user": session["user"], "cached": True})
        with _db() as db:
            row = db.execute("SELECT user FROM sessions WHERE token = ?", (token,)).fetchone()
        if row is None:
            return _json(start, "401 Unauthorized", {"error": "not logged in"})
        cache().set(token, {"user": row[0]}, TTL_SECONDS)
        return _json(start, "200 OK", {"user": row[0], "cached": False})
    if path == "/logout" and method == "POST":
        token = _token(environ)
        with _db() as db:
            db.execute("DELETE FROM sessions WHERE token = ?", (token,))
        cache().invalidate(token)
        return _json(start, "200 OK", {"logged_out": True})
    if path == "/test/hold-lock" and os.environ.get("SHMCACHE_DEMO_TEST_HOOKS") == "1":
        # Test-only: take the segment lock and stall, so a test can SIGKILL this worker
        # while it holds the lock (what gunicorn's timeout does to a stuck worker).
        shm: Any = cache()
        shm._lock.acquire()
        start("200 OK", [("Content-Type", "text/plain")])
        time.sleep(3600)
        return [b""]
    return _json(start, "404 Not Found", {"error": "no such route"})
