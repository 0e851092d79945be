"""The real app (issue 11), end to end: ``bench.fastapi_app`` (FastAPI, the seed's pydantic
``Session``, SQLite) under ``gunicorn -k uvicorn_worker.UvicornWorker -w 4``, each cache in
turn, with a sync and an async auth dependency.

One server per (dependency, cache), one after the other. Each round on it: restore every
session row, an unmeasured warm-up, then wrk (32 connections, 200 users, a random user per
request) for the round's length, first with keep-alive connections (the kernel may give
all of them to one worker: the field notes saw ``[9383, 16, 4, 4]``), then with a new
connection per request (spread over every worker, as a load balancer would). While the
load runs, some users log out (``POST /logout``: delete the row, then ``invalidate``);
every request of theirs that the app accepts after the logout returned is a stale
acceptance. The workers count requests, cache hits and database validations themselves
(``bench.appcounters``), so the figures need no answer from any particular worker.
"""

from __future__ import annotations

import datetime
import http.client
import importlib.util
import json
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from . import appcounters, httpclient
from .auth import sign
from .backends import Resources, segment_name
from .config import Config
from .e2e import WORKERS, Gunicorn, wrk
from .progress import Progress
from .redis_server import RedisServer
from .stats import ratio

USERS = 200
CONNECTIONS = 32
WORKER_CLASS = "uvicorn_worker.UvicornWorker"
DEPENDENCIES = ("sync", "async")
MODES = {"keepalive": "keep-alive", "close": "new connection per request"}
_SHM_STATS = ("entries", "hits", "misses", "oversize", "evictions", "lock_recoveries")


@dataclass(frozen=True)
class AppCache:
    key: str
    label: str
    spec: str  # "seed", "gunicorn" (shmcache.gunicorn hooks), "redis", or an open_cache URL
    value_size: int = 0

    def missing(self) -> str | None:
        if self.spec == "redis":
            if importlib.util.find_spec("redis") is None:
                return "python package 'redis' not installed"
            return RedisServer.missing()
        return None


BUILTIN = (
    AppCache("inmemory", f"InMemorySessionCache (seed), {WORKERS} workers", "seed"),
    AppCache("shm", "shmcache, hash-only (value_size=0)", "gunicorn", 0),
    AppCache("shm-256", "shmcache, value_size=256", "gunicorn", 256),
    AppCache("shm-512", "shmcache, value_size=512", "gunicorn", 512),
    AppCache("shm-4096", "shmcache, value_size=4096 (the README's recipe)", "gunicorn", 4096),
    AppCache("redis", "Redis (loopback)", "redis"),
)
BUILTIN_KEYS = tuple(c.key for c in BUILTIN)


def missing() -> str | None:
    """Why this section cannot run here, or None."""
    for module, package in (("fastapi", "fastapi"), ("pydantic", "pydantic"),
                            ("uvicorn_worker", "uvicorn-worker"), ("gunicorn", "gunicorn")):
        if importlib.util.find_spec(module) is None:
            return f"python package {package!r} not installed (pip install -e '.[bench]')"
    return None


def url_cache(index: int, text: str) -> AppCache:
    """``--app-cache [LABEL=]URL``: any backend ``open_cache`` knows."""
    label, sep, url = text.partition("=")
    if not sep or "://" in label:
        label, url = "", text
    return AppCache(f"url-{index}", label or _masked(url), url)


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _segment_of(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme == "shm":
        return parts.netloc or parts.path.lstrip("/")
    if parts.scheme.startswith("shm+"):
        return parse_qs(parts.query).get("shm", [None])[0]
    return None


def _fresh(url: str) -> str | None:
    """Empty the cache ``url`` names before a server uses it (else it would start warm with
    the previous server's sessions); the name of a segment this made, to remove at the end."""
    from shmcache import SegmentNotFound, SharedMemorySessionCache, open_cache

    name, created = _segment_of(url), None
    if name:
        try:
            SharedMemorySessionCache.attach(name).close()
        except SegmentNotFound:
            created = name
    cache = open_cache(url)
    try:
        cache.clear()
    finally:
        close = getattr(cache, "close", None)
        if close is not None:
            close()
    return created


class _Database:
    """The app's ``sessions`` table: one row per user, tokens signed like the seed app's."""

    def __init__(self, path: Path, secret: bytes, users: int) -> None:
        self.path = path
        now = datetime.datetime.now(datetime.timezone.utc)
        created = now.isoformat(timespec="seconds")
        expires = (now + datetime.timedelta(days=30)).isoformat(timespec="seconds")
        # token_urlsafe(72) + "." + 32 hex digits of HMAC: 129 characters, as in the field.
        self.rows = {uid: (uid, sign(secrets.token_urlsafe(72), secret), created, expires)
                     for uid in range(1, users + 1)}
        conn = sqlite3.connect(path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a logout
            conn.execute("CREATE TABLE sessions (id INTEGER PRIMARY KEY, token TEXT UNIQUE "
                         "NOT NULL, created_at TEXT NOT NULL, expires_at TEXT NOT NULL)")
            conn.commit()
        finally:
            conn.close()
        self.restore()

    def restore(self) -> None:
        """Every user logged in again (same token): the start of every round."""
        conn = sqlite3.connect(self.path, timeout=10)
        try:
            with conn:
                conn.executemany("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
                                 self.rows.values())
        finally:
            conn.close()

    def token(self, uid: int) -> str:
        return self.rows[uid][1]


def _logout(port: int, token: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/logout", headers={"Authorization": f"Bearer {token}",
                                                 "Connection": "close"})
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return {"status": None, "error": str(exc)}
    finally:
        conn.close()
    out: dict[str, Any] = {"status": response.status}
    if response.status == 200:
        out.update(json.loads(body))
    return out


class _Logouts(threading.Thread):
    """Logs ``users`` out one by one between 20% and 60% of the round, so every logout is
    followed by at least 40% of the round under load."""

    def __init__(self, port: int, db: _Database, users: list[int], seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.db, self.users, self.seconds = port, db, users, seconds
        self.done: dict[int, int] = {}
        self.failed: list[dict[str, Any]] = []

    def run(self) -> None:
        start = time.monotonic()
        for i, uid in enumerate(self.users):
            at = start + self.seconds * (0.2 + 0.4 * i / max(1, len(self.users) - 1))
            time.sleep(max(0.0, at - time.monotonic()))
            answer = _logout(self.port, self.db.token(uid))
            if answer.get("status") == 200:
                self.done[uid] = int(answer["done_ns"])
            else:
                self.failed.append({"user": uid, **answer})


def _load(port: int, token_file: Path, pool: list[str], seconds: float, close: bool,
          use_wrk: bool) -> dict[str, Any]:
    if use_wrk:
        return wrk(port, token_file, seconds, CONNECTIONS, close)
    return httpclient.load(port, pool, seconds, procs=2, threads=CONNECTIONS // 2,
                           keepalive=not close)


def _round(server: Gunicorn, state: Path, db: _Database, token_file: Path, cfg: Config,
           close: bool, users: list[int], use_wrk: bool) -> dict[str, Any]:
    pool = [db.token(u) for u in db.rows]
    db.restore()
    if cfg.app_warmup > 0:  # unmeasured: the caches hold the users when the round begins
        _load(server.port, token_file, pool, cfg.app_warmup, close, use_wrk)
    before = appcounters.read_counters(state)
    logouts = _Logouts(server.port, db, users, cfg.app_seconds)
    logouts.start()
    load = _load(server.port, token_file, pool, cfg.app_seconds, close, use_wrk)
    logouts.join(timeout=30)
    until = time.monotonic_ns()
    per_worker = appcounters.delta(before, appcounters.read_counters(state))
    t = appcounters.total(per_worker)
    accepted = t["hits"] + t["db_found"]
    errors = load["errors"]
    stale = appcounters.stale_acceptances(appcounters.read_accepts(state), logouts.done, until)
    stale["failed"] = logouts.failed
    return {
        "requests": load["requests"], "duration_us": load["duration_us"],
        "rps": load["requests"] / (load["duration_us"] / 1e6),
        "latency_us": {p: load["latency_us"][p] for p in ("p50", "p99", "p999")},
        "socket_errors": sum(v for k, v in errors.items() if k != "status"),
        "non_2xx": errors.get("status"),
        "counted": t, "accepted": accepted,
        # The cache's job: validations per 1000 requests of live sessions. A logged-out
        # token's requests all go to the database by design; they are counted apart.
        "validations_per_1000": ratio(1000 * t["db_found"], accepted),
        "db_lookups_per_1000_requests": ratio(1000 * t["db_lookups"], t["requests"]),
        "per_worker": sorted((c["requests"] for c in per_worker.values()), reverse=True),
        "stale": stale,
    }


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One figure per variant from its rounds: sums of counts, means of percentiles."""
    t = {k: sum(r["counted"][k] for r in rounds) for k in appcounters.FIELDS}
    requests = sum(r["requests"] for r in rounds)
    accepted = t["hits"] + t["db_found"]
    n = len(rounds)
    return {
        "rps": requests / (sum(r["duration_us"] for r in rounds) / 1e6),
        "requests": requests,
        "latency_us": {p: sum(r["latency_us"][p] for r in rounds) / n
                       for p in ("p50", "p99", "p999")},
        "validations_per_1000": ratio(1000 * t["db_found"], accepted),
        "db_lookups_per_1000_requests": ratio(1000 * t["db_lookups"], t["requests"]),
        "counted": t, "accepted": accepted,
        "socket_errors": sum(r["socket_errors"] for r in rounds),
        "stale": {k: (max if k == "longest_ms" else sum)(r["stale"][k] for r in rounds)
                  for k in ("logouts", "accepted_after_logout", "users", "longest_ms",
                            "overlapping_validations")},
        "logout_failures": sum(len(r["stale"]["failed"]) for r in rounds),
        "per_worker": rounds[-1]["per_worker"],
        "rounds": rounds,
    }


def _server(cache: AppCache, dependency: str, res: Resources, db: _Database, secret: str,
            state: Path, watched: list[int], ttl: float) -> tuple[Gunicorn, str | None]:
    env = {"BENCH_DEPENDENCY": dependency, "BENCH_DB": str(db.path), "BENCH_SECRET": secret,
           "BENCH_TTL": str(ttl), "BENCH_STATE": str(state),
           "BENCH_WATCH": ",".join(map(str, watched))}
    segment = None
    if cache.spec == "gunicorn":
        segment = segment_name("app")
        env.update({"BENCH_CACHE": "gunicorn", "BENCH_SHM_HOOKS": "1",
                    "SHMCACHE_NAME": segment, "SHMCACHE_CAPACITY": "65536",
                    "SHMCACHE_VALUE_SIZE": str(cache.value_size)})
    elif cache.spec == "redis":
        prefix = segment_name("app").replace("shmcache-bench", "shmcache-bench-app")
        env["BENCH_CACHE"] = f"redis://127.0.0.1:{res.redis_port()}/0?prefix={prefix}:"
    else:
        env["BENCH_CACHE"] = cache.spec
    log = Path(res.tmpdir) / f"app-{cache.key}-{dependency}.log"
    server = Gunicorn("bench.fastapi_app:app", env, log, worker_class=WORKER_CLASS)
    try:
        server.workers()
    except BaseException:
        server.stop()
        raise
    return server, segment


def _shm_stats(segment: str) -> dict[str, Any]:
    from shmcache import SharedMemorySessionCache, ShmCacheError

    try:
        with SharedMemorySessionCache.attach(segment) as cache:
            stats = cache.stats()
    except ShmCacheError as exc:
        return {"error": str(exc)}
    return {k: stats[k] for k in _SHM_STATS if k in stats}


def run(cfg: Config, res: Resources, progress: Progress,
        urls: tuple[str, ...] = ()) -> dict[str, Any]:
    reason = missing()
    if reason is not None:
        progress.note(f"skipped the real app: {reason}")
        return {"skipped": reason, "caches": {}}
    caches = [c for c in BUILTIN if c.key in cfg.app_caches]
    caches += [url_cache(i, u) for i, u in enumerate(urls, 1)]
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        progress.note("wrk not installed (apt-get install wrk): the real app is loaded by "
                      "the Python client")
    secret = secrets.token_hex(16)
    workdir = Path(res.tmpdir)
    db = _Database(workdir / "app-sessions.sqlite3", secret.encode(), USERS)
    token_file = workdir / "app-tokens.txt"
    token_file.write_text("\n".join(db.token(u) for u in db.rows) + "\n")
    k = cfg.app_logouts
    plan = [(r, mode) for r in range(cfg.app_rounds) for mode in MODES]
    # Each round logs out its own users (rows are restored between rounds anyway).
    users_of = {rm: [(i * k + j) % USERS + 1 for j in range(k)] for i, rm in enumerate(plan)}
    watched = sorted({u for us in users_of.values() for u in us})
    out: dict[str, Any] = {}
    created: list[str] = []
    try:
        for cache in caches:
            row: dict[str, Any] = {"label": cache.label, "spec": _masked(cache.spec),
                                   "value_size": cache.value_size, "variants": {},
                                   "skipped_variants": {}, "cache_stats": {}}
            out[cache.key] = row
            reason = cache.missing()
            if reason is not None:
                progress.note(f"skipped {cache.label}: {reason}")
                row["skipped"] = reason
                continue
            for dependency in cfg.app_dependencies:
                progress.step(f"{cache.label}, {dependency} dependency: starting gunicorn")
                try:
                    if "://" in cache.spec:
                        made = _fresh(cache.spec)
                        created += [made] if made else []
                    state = workdir / f"state-{cache.key}-{dependency}"
                    state.mkdir()
                    server, segment = _server(cache, dependency, res, db, secret, state,
                                              watched, cfg.app_ttl)
                except Exception as exc:  # a backend that will not start: say so, go on
                    progress.note(f"skipped {cache.label} ({dependency}): {exc}")
                    row["skipped_variants"][dependency] = str(exc)
                    continue
                rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
                try:
                    for r, mode in plan:
                        progress.step(f"{cache.label}, {dependency}, {MODES[mode]}, "
                                      f"round {r + 1}/{cfg.app_rounds}")
                        rounds[mode].append(_round(server, state, db, token_file, cfg,
                                                   mode == "close", users_of[(r, mode)],
                                                   use_wrk))
                    if segment is not None:
                        row["cache_stats"][dependency] = _shm_stats(segment)
                finally:
                    server.stop()
                row["variants"][dependency] = {m: _combine(rs) for m, rs in rounds.items()}
    finally:
        for name in created:
            _unlink(name)
    _ratios(out)
    return {
        "server": f"gunicorn -k {WORKER_CLASS} -w {WORKERS}, bench.fastapi_app (FastAPI, "
                  "pydantic Session, SQLite)",
        "client": (f"wrk -t1 -c{CONNECTIONS}" if use_wrk else
                   f"bench.httpclient (2 processes x {CONNECTIONS // 2} threads)"),
        "users": USERS, "ttl": cfg.app_ttl, "seconds": cfg.app_seconds, "warmup": cfg.app_warmup,
        "rounds": cfg.app_rounds, "logouts_per_round": k, "modes": MODES,
        "dependencies": list(cfg.app_dependencies), "caches": out,
    }


def _ratios(out: dict[str, Any]) -> None:
    """Each variant's validations per 1000 requests over the seed's in the same variant."""
    seed = out.get("inmemory", {}).get("variants", {})
    for row in out.values():
        for dep, modes in row["variants"].items():
            for mode, v in modes.items():
                base = seed.get(dep, {}).get(mode, {}).get("validations_per_1000")
                v["validations_ratio"] = ratio(v["validations_per_1000"], base)


def _unlink(name: str) -> None:
    from shmcache import SharedMemorySessionCache, ShmCacheError

    try:
        with SharedMemorySessionCache.attach(name) as cache:
            cache.unlink()
    except ShmCacheError:
        pass

