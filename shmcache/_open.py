"""``open_cache(url)``: choose a backend from one configuration string.

    memory://                          InMemorySessionCache (one process; the seed's cache)
    noop://                            NoOpSessionCache (caching off)
    shm://NAME?capacity=65536&value_size=256&lock_timeout=1&lease_timeout=10
                                       SharedMemorySessionCache, created if missing, else
                                       attached
    redis://[user:password@]host:6379/0?prefix=shmcache:&timeout=1&fail_open=false
    rediss://...  unix:///path/redis.sock?db=0
    redis+cluster://host:7000[,host:7001...]/   rediss+cluster://...
    redis+sentinel://host:26379[,host:26380...]/SERVICE[/db]   rediss+sentinel://...
    valkey://... (and each form above with valkey for redis: the valkey-py client)
                                       RedisSessionCache; every Redis form also takes
                                       min_replicas=N&replica_timeout=0.5&lease_timeout=10
    shm+redis://host:6379/0?shm=NAME&capacity=65536&value_size=256&max_staleness=1
    shm+ + any Redis form above (shm+rediss://, shm+unix://, shm+redis+cluster://...)
                                       TieredSessionCache: the shm table in front of Redis
                                       (lease_timeout applies to both tiers)
    sqlite:////abs/path.db  postgresql://user@host/db  postgres://...
    shm+postgresql://user@host/db?shm=NAME&value_size=1024&max_staleness=1
                                       DatabaseSessionCache, and the shm table in front of
                                       PostgreSQL (see shmcache.sql.urls)

Keyword options go to the constructors (``codec=``, ``secret=``, ``clock=``...) and win over
the same parameter in the URL. ``user_id_of=`` (a callable deriving the user from a session,
for ``invalidate_by_user``) is accepted by every scheme, so an app passes it whatever the
URL says (``noop://`` has nothing to file). Query parameters that are not ours on a Redis
URL go to redis-py if it knows them (``socket_keepalive``, ``ssl_cert_reqs``...). Anything
else is an ``InvalidArgument`` that names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ._errors import (
    InvalidArgument,
    InvalidType,
)
from ._protocol import SessionCache
from .memory import InMemorySessionCache, NoOpSessionCache
from .redis.cache import RedisSessionCache
from .redis.client import SCHEMES as REDIS_SCHEMES
from .redis.client import library_params, redact
from .shm.cache import SharedMemorySessionCache
from .shm.startup import create_or_attach
from .sql.urls import OPENERS as _SQL_OPENERS
from .tiered import TieredSessionCache

_SHM_PARAMS = {"capacity": int, "value_size": int, "lock_timeout": float}
_REDIS_PARAMS = {
    "prefix": str,
    "timeout": float,
    "fail_open": bool,
    "min_replicas": int,
    "replica_timeout": float,
    "lease_timeout": float,
}
_LEASE_PARAM = {"lease_timeout": float}  # seconds a miss's lease lives (issue 11)
_TIER_PARAMS = {"shm": str, "max_staleness": float, "subscribe": bool}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def open_cache(url: str, **options: Any) -> SessionCache:
    """The ``SessionCache`` that ``url`` describes (see the module docstring for schemes).

    ``shm://NAME`` attaches to the segment if it exists and creates it otherwise (a race
    between processes doing both is settled: the loser attaches). Capacity and value size
    given in the URL must match an existing segment's, or ``InvalidArgument`` says so. Under
    gunicorn, call it at import with ``preload_app = True`` and the master creates the
    segment before forking, so workers inherit it; without preload, the first worker
    creates it and the others attach. Either way the segment outlives the processes (a
    restart finds the sessions still there, each one until its TTL ends); to remove it at
    shutdown, use the ``shmcache.gunicorn`` hooks instead.
    """
    if not isinstance(url, str):
        raise InvalidType(f"cache URL must be a str, got {type(url).__name__}")
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise InvalidArgument(f"cache URL {redact(url)!r} has no scheme: {_SCHEMES_HELP}")
    opener = _OPENERS.get(scheme.lower())
    if opener is None:
        raise InvalidArgument(
            f"unknown cache URL scheme {scheme!r} in {redact(url)!r}: {_SCHEMES_HELP}"
        )
    return opener(url, options)


# -- one opener per scheme ---------------------------------------------------------------


def _open_memory(url: str, options: dict[str, Any]) -> SessionCache:
    _no_location(url)
    _params(url, {})
    _check_options(url, options, {"clock", "user_id_of"})
    return InMemorySessionCache(**options)


def _open_noop(url: str, options: dict[str, Any]) -> SessionCache:
    _no_location(url)
    _params(url, {})
    _check_options(url, options, {"user_id_of"})
    return NoOpSessionCache()


def _open_shm(url: str, options: dict[str, Any]) -> SessionCache:
    parts = urlsplit(url)
    name = parts.netloc or parts.path.lstrip("/")
    if not name or (parts.netloc and parts.path not in ("", "/")):
        raise InvalidArgument(f"{redact(url)!r}: write the segment name as shm://NAME")
    settings = {**_params(url, {**_SHM_PARAMS, **_LEASE_PARAM}), **options}
    _check_options(
        url, settings, {*_SHM_PARAMS, *_LEASE_PARAM, "codec", "clock", "user_id_of"}
    )
    return _shm_create_or_attach(name, settings)


def _open_redis(url: str, options: dict[str, Any]) -> SessionCache:
    redis_url, ours = _split_redis_url(url, _REDIS_PARAMS)
    settings = {**ours, **options}
    _check_options(url, settings, {*_REDIS_PARAMS, "codec", "secret", "clock", "user_id_of"})
    return RedisSessionCache(redis_url, **settings)


def _open_tiered(url: str, options: dict[str, Any]) -> SessionCache:
    redis_url, ours = _split_redis_url(url[len("shm+") :], {
        **_REDIS_PARAMS, **_SHM_PARAMS, **_TIER_PARAMS
    })
    settings = {**ours, **options}
    allowed = {
        *_REDIS_PARAMS, *_SHM_PARAMS, *_TIER_PARAMS, "codec", "secret", "clock", "user_id_of"
    }
    _check_options(url, settings, allowed)
    name = settings.pop("shm", None)
    if not name:
        raise InvalidArgument(
            f"{redact(url)!r}: name the host's segment, e.g. ?shm=myapp-sessions"
        )
    shm_settings: dict[str, Any] = {
        k: settings.pop(k) for k in (*_SHM_PARAMS, "codec") if k in settings
    }
    if "lease_timeout" in settings:  # both tiers: the local one keeps leases of its own
        shm_settings["lease_timeout"] = settings["lease_timeout"]
    # user_id_of is the tiered cache's: it hands each tier the user explicitly.
    tier_settings: dict[str, Any] = {
        k: settings.pop(k) for k in ("max_staleness", "subscribe", "user_id_of") if k in settings
    }
    clock = settings.get("clock")
    if "codec" in shm_settings:
        settings["codec"] = shm_settings["codec"]
    if clock is not None:
        shm_settings["clock"] = tier_settings["clock"] = clock
    remote = RedisSessionCache(redis_url, **settings)
    try:
        local = _shm_create_or_attach(name, shm_settings)
    except BaseException:
        remote.close()
        raise
    try:
        return TieredSessionCache(local, remote, **tier_settings)
    except BaseException:
        local.close()
        remote.close()
        raise


_OPENERS: dict[str, Callable[[str, dict[str, Any]], SessionCache]] = {
    "memory": _open_memory,
    "noop": _open_noop,
    "shm": _open_shm,
    **{scheme: _open_redis for scheme in REDIS_SCHEMES},
    **{"shm+" + scheme: _open_tiered for scheme in REDIS_SCHEMES},
    **_SQL_OPENERS,  # sqlite://, postgresql://, postgres://, shm+postgresql:// (issue 14)
}
_SCHEMES_HELP = "use one of " + ", ".join(f"{s}://" for s in _OPENERS)


# -- helpers -----------------------------------------------------------------------------


def _shm_create_or_attach(name: str, settings: dict[str, Any]) -> SharedMemorySessionCache:
    capacity = settings.get("capacity")
    value_size = settings.get("value_size")
    common = {
        k: settings[k]
        for k in ("codec", "clock", "lock_timeout", "user_id_of", "lease_timeout")
        if k in settings
    }
    # Processes starting together (uvicorn --workers) all land on the creator's segment.
    cache = create_or_attach(
        name,
        65536 if capacity is None else capacity,
        0 if value_size is None else value_size,
        **common,
    )
    wanted = {"capacity": capacity, "value_size": value_size}
    have = {"capacity": cache.capacity, "value_size": cache.value_size}
    wrong = [
        f"{k} {have[k]} (asked: {v})" for k, v in wanted.items() if v not in (None, have[k])
    ]
    if wrong:
        cache.close()
        raise InvalidArgument(
            f"shared-memory segment {name!r} already exists with {', '.join(wrong)}: "
            f"remove it while no process uses it (shmcache unlink {name}) or ask for "
            "what it has"
        )
    return cache


def _split_redis_url(url: str, ours: dict[str, type]) -> tuple[str, dict[str, Any]]:
    """``url`` without our parameters (for the client library), and our parameters,
    converted. The rest of the URL (hosts, path, the library's options) is checked by
    ``shmcache.redis.client`` when the client is made."""
    if urlsplit(url).fragment:
        raise InvalidArgument(f"{redact(url)!r}: a cache URL has no #fragment")
    library = library_params(url)
    mine: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for key, raw in _pairs(url):
        if key in ours:
            mine[key] = _convert(url, key, raw, ours[key])
        elif key in library:
            theirs.append((key, raw))
        else:
            accepted = ", ".join(sorted({*ours, *library}))
            raise InvalidArgument(
                f"unknown parameter {key!r} in {redact(url)!r}; accepted: {accepted}"
            )
    # Not urlunsplit: it turns unix:///path into unix:/path, which the libraries refuse.
    scheme = url.partition("://")[0]
    base = scheme.lower() + url[len(scheme) :].partition("?")[0]
    return (base + "?" + urlencode(theirs) if theirs else base), mine


def _pairs(url: str) -> list[tuple[str, str]]:
    query = urlsplit(url).query
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise InvalidArgument(f"{redact(url)!r}: bad query string ({exc})") from None
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise InvalidArgument(f"{redact(url)!r}: parameter {key!r} is given twice")
        seen.add(key)
    return pairs


def _params(url: str, allowed: dict[str, type]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in _pairs(url):
        if key not in allowed:
            accepted = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(
                f"unknown parameter {key!r} in {redact(url)!r}; accepted: {accepted}"
            )
        out[key] = _convert(url, key, raw, allowed[key])
    return out


def _convert(url: str, key: str, raw: str, kind: type) -> Any:
    if kind is str:
        if not raw:
            raise InvalidArgument(f"{redact(url)!r}: {key} must not be empty")
        return raw
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise InvalidArgument(f"{redact(url)!r}: {key} must be true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InvalidArgument(f"{redact(url)!r}: {key} must be {what}, got {raw!r}") from None


def _no_location(url: str) -> None:
    parts = urlsplit(url)
    if parts.netloc or parts.path not in ("", "/"):
        raise InvalidArgument(f"{redact(url)!r}: {parts.scheme}:// takes no host or path")


def _check_options(url: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidArgument(
            f"option {unknown[0]!r} does not apply to {redact(url)!r}; accepted: "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )
