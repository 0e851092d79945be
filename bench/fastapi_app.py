"""The real app of issue 11 (bench layer): FastAPI, the seed's pydantic ``Session``, SQLite.

Shaped like the seed app: the auth dependency reads the bearer token, asks the cache; on a
miss it checks the token's signature, validates it against the ``sessions`` table and calls
``cache.set(token, session, TTL)``. ``POST /logout`` deletes the row, then calls
``cache.invalidate(token)`` (in that order: the other order lets a request that misses in
between find the row and cache it again, an app bug rather than the cache's). Served by
``gunicorn -k uvicorn_worker.UvicornWorker -w 4`` from ``bench.app``; every worker imports
this module (no ``preload_app``).

Environment (set by ``bench.app``):

* ``BENCH_CACHE``: ``seed`` (the seed's ``InMemorySessionCache``, verbatim), ``gunicorn``
  (``shmcache.gunicorn.get_cache()``, the README's recipe: the master's hooks made the
  segment) or any ``open_cache`` URL;
* ``BENCH_DEPENDENCY``: ``sync`` (a ``def`` dependency: FastAPI runs it in its thread pool)
  or ``async`` (an ``async def`` dependency that awaits the database in a thread, as an
  async driver would, so other requests run between its miss and its ``set``);
* ``BENCH_DB`` (the SQLite file), ``BENCH_SECRET`` (the tokens' HMAC key), ``BENCH_TTL``
  (10 s), ``BENCH_STATE`` and ``BENCH_WATCH`` (see ``bench.appcounters``).
"""

from __future__ import annotations

import datetime
import hmac
import os
import sqlite3
import threading
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.concurrency import run_in_threadpool

from bench.appcounters import WorkerCounters
from bench.auth import sign
from bench.models import Session

SECRET = os.environ.get("BENCH_SECRET", "bench-secret").encode()
TTL = float(os.environ.get("BENCH_TTL", "10"))
DB = os.environ.get("BENCH_DB", "sessions.sqlite3")
DEPENDENCY = os.environ.get("BENCH_DEPENDENCY", "sync")


def _make_cache() -> Any:
    spec = os.environ.get("BENCH_CACHE", "seed")
    if spec == "seed":
        from bench.seed import InMemorySessionCache

        return InMemorySessionCache()
    if spec == "gunicorn":
        from shmcache.gunicorn import get_cache

        return get_cache()
    from shmcache import open_cache

    return open_cache(spec)


cache = _make_cache()
counters = WorkerCounters(
    os.environ.get("BENCH_STATE", "."),
    frozenset(int(u) for u in os.environ.get("BENCH_WATCH", "").split(",") if u),
)
_local = threading.local()


def _db() -> sqlite3.Connection:
    # One connection per thread: sqlite3 connections must stay in the thread that made them.
    conn: sqlite3.Connection | None = getattr(_local, "conn", None)
    if conn is None:
        conn = sqlite3.connect(DB, timeout=10)
        _local.conn = conn
    return conn


def lookup(token: str) -> Session | None:
    """The database validation: the row for this token, if it has not expired."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    row = _db().execute(
        "SELECT id, token, created_at, expires_at FROM sessions "
        "WHERE token = ? AND expires_at > ?", (token, now),
    ).fetchone()
    if row is None:
        return None
    return Session(id=row[0], token=row[1], created_at=row[2], expires_at=row[3])


def _bearer(authorization: str) -> str:
    token = authorization[7:] if authorization.startswith("Bearer ") else ""
    raw, _, _ = token.rpartition(".")
    # A forged or mangled token never costs a database query.
    if not raw or not hmac.compare_digest(sign(raw, SECRET), token):
        counters.add("requests", "rejected")
        raise HTTPException(status_code=401, detail="not authenticated")
    return token


def _found(session: Session | None, token: str, t0: int) -> Session:
    if session is None:
        counters.add("requests", "db_lookups", "rejected")
        raise HTTPException(status_code=401, detail="not authenticated")
    cache.set(token, session, TTL)
    counters.add("requests", "db_lookups", "db_found")
    counters.accepted(session.id, t0, validated=True)
    return session


def _hit(session: Session, t0: int) -> Session:
    counters.add("requests", "hits")
    counters.accepted(session.id, t0, validated=False)
    return session


def current_session_sync(authorization: Annotated[str, Header()] = "") -> Session:
    token = _bearer(authorization)
    t0 = time.monotonic_ns()
    session = cache.get(token)
    if session is not None:
        return _hit(session, t0)
    return _found(lookup(token), token, t0)


async def current_session_async(authorization: Annotated[str, Header()] = "") -> Session:
    token = _bearer(authorization)
    t0 = time.monotonic_ns()
    session = cache.get(token)
    if session is not None:
        return _hit(session, t0)
    return _found(await run_in_threadpool(lookup, token), token, t0)


current_session = current_session_async if DEPENDENCY == "async" else current_session_sync
CurrentSession = Annotated[Session, Depends(current_session)]
app = FastAPI()


@app.get("/me")
async def me(session: CurrentSession) -> dict[str, int]:
    return {"id": session.id}


@app.post("/logout")
async def logout(session: CurrentSession) -> dict[str, Any]:
    await run_in_threadpool(_delete, session.token)
    cache.invalidate(session.token)
    done = time.monotonic_ns()  # the logout has returned: from here on, a hit is stale
    counters.add("logouts")
    return {"logged_out": session.id, "done_ns": done, "worker": os.getpid()}


def _delete(token: str) -> None:
    conn = _db()
    with conn:
        conn.execute("DELETE FROM sessions WHERE token = ?", (token,))


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}
