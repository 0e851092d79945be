"""Database URLs: which store a URL names, and the ``open_cache`` schemes built on them.

Layer: configuration, between the storage layer (``sqlite.py``, ``postgres.py``) and the
entry points (``DatabaseSessionCache``, ``shmcache._open``, the admin command).

    sqlite:////abs/path/sessions.db      4 slashes: an absolute path
    sqlite:///relative/sessions.db       3 slashes: relative to the working directory
                                         (made absolute once, so a chdir changes nothing)
    postgresql://user:pw@host:5432/db?sslmode=require   (also postgres://): libpq's URL;
                                         its query parameters are libpq's
    shm+postgresql://user@host/db?shm=NAME&value_size=1024&max_staleness=1
                                         the host's shared-memory table in front

``open_cache`` also takes ``table``, ``timeout``, ``fail_open``, ``lease_timeout`` (and
``unlogged`` on PostgreSQL) in the query string; ``DatabaseSessionCache(url)`` takes them
as arguments.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from .. import _open
from .._errors import InvalidArgument, InvalidType
from .._protocol import SessionCache
from ..redis.client import redact
from .store import SqlStore

DIALECTS = ("sqlite", "postgresql")
_SCHEMES = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}
_DB_PARAMS: dict[str, type] = {
    "table": str, "timeout": float, "fail_open": bool, "lease_timeout": float,
}
_PG_PARAMS: dict[str, type] = {**_DB_PARAMS, "unlogged": bool}
_OPTIONS = {"codec", "secret", "clock", "user_id_of"}

__all__ = ["DIALECTS", "dialect_of", "make_store", "redact"]


def dialect_of(url: str) -> str | None:
    """``"sqlite"`` or ``"postgresql"`` for a database URL, else None."""
    scheme, sep, _ = url.partition("://")
    return _SCHEMES.get(scheme.lower()) if sep else None


def sqlite_path(url: str) -> str:
    """The absolute file path a ``sqlite:///`` URL names."""
    parts = urlsplit(url)
    if parts.netloc:
        raise InvalidArgument(
            f"{url!r}: a SQLite URL has no host; write sqlite:////absolute/path.db"
        )
    if parts.query or parts.fragment:
        raise InvalidArgument(
            f"{url!r}: pass table, timeout and fail_open as arguments (or use open_cache)"
        )
    path = unquote(parts.path[1:])
    if not path or path == ":memory:":
        raise InvalidArgument(
            f"{url!r}: name a database file, e.g. sqlite:////var/lib/myapp/sessions.db "
            "(an in-memory database is not shared between processes: use memory://)"
        )
    if "\x00" in path:
        raise InvalidArgument(f"{url!r}: the path contains a NUL character")
    return os.path.abspath(path)


def make_store(
    url: str | None,
    connect: Callable[[], Any] | None,
    dialect: str | None,
    table: str,
    timeout: float,
    unlogged: bool,
) -> SqlStore:
    """The store for ``DatabaseSessionCache``'s connection arguments, checked."""
    if (url is None) == (connect is None):
        raise InvalidArgument("give a database URL or connect= (and dialect=), not both")
    if dialect is not None:
        if not isinstance(dialect, str) or _SCHEMES.get(dialect.lower()) is None:
            raise InvalidArgument(f"dialect must be 'sqlite' or 'postgresql', got {dialect!r}")
        dialect = _SCHEMES[dialect.lower()]
    if url is not None:
        if not isinstance(url, str):
            raise InvalidType(f"database URL must be a str, got {type(url).__name__}")
        found = dialect_of(url)
        if found is None:
            raise InvalidArgument(
                f"{redact(url)!r} is not a database URL: use sqlite:////path/file.db or "
                "postgresql://user@host/db"
            )
        if dialect is not None and dialect != found:
            raise InvalidArgument(f"dialect={dialect!r} but the URL is {found}")
        dialect = found
    elif not callable(connect):
        raise InvalidType(f"connect must be callable, got {type(connect).__name__}")
    elif dialect is None:
        raise InvalidArgument("connect= needs dialect='sqlite' or dialect='postgresql'")
    if dialect == "sqlite":
        from .sqlite import SqliteStore

        path = None if url is None else sqlite_path(url)
        return SqliteStore(table, timeout, path=path, connect=connect)
    from .pg_connections import conninfo_params
    from .postgres import PostgresStore

    if url is not None:
        conninfo_params(_hint(url))
    return PostgresStore(table, timeout, url=url, connect=connect, unlogged=unlogged)


def _hint(url: str) -> str:
    """``url`` if libpq accepts it; else ``InvalidArgument`` saying where ours go."""
    hosts = urlsplit(url).netloc.rpartition("@")[2]
    for host in hosts.split(","):  # libpq takes host1:port1,host2:port2
        match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::(.*))?", host)
        port = match.group(2) if match else None
        if port and not port.isdigit():
            raise InvalidArgument(f"{redact(url)!r}: port {port!r} is not a number")
    for key, _ in _open._pairs(url):
        if key in _PG_PARAMS:
            raise InvalidArgument(
                f"parameter {key!r} in {redact(url)!r} is not a libpq option: pass it as an "
                "argument (or use open_cache)"
            )
    return url


# -- open_cache schemes --------------------------------------------------------------------


def _split(url: str, ours: dict[str, type]) -> tuple[str, dict[str, Any]]:
    """``url`` without our query parameters (the rest are libpq's), and ours, converted."""
    parts = urlsplit(url)
    if parts.fragment:
        raise InvalidArgument(f"{redact(url)!r}: a cache URL has no #fragment")
    mine: dict[str, Any] = {}
    theirs: list[tuple[str, str]] = []
    for key, raw in _open._pairs(url):
        if key in ours:
            mine[key] = _open._convert(url, key, raw, ours[key])
        else:
            theirs.append((key, raw))
    base = url.partition("?")[0]
    return (base + "?" + urlencode(theirs) if theirs else base), mine


def open_sqlite(url: str, options: dict[str, Any]) -> SessionCache:
    from .cache import DatabaseSessionCache

    if urlsplit(url).fragment:
        raise InvalidArgument(f"{url!r}: a cache URL has no #fragment")
    settings = {**_open._params(url, _DB_PARAMS), **options}
    _open._check_options(url, settings, {*_DB_PARAMS, *_OPTIONS})
    return DatabaseSessionCache(url.partition("?")[0], **settings)


def open_postgres(url: str, options: dict[str, Any]) -> SessionCache:
    from .cache import DatabaseSessionCache

    base, ours = _split(url, _PG_PARAMS)
    settings = {**ours, **options}
    _open._check_options(url, settings, {*_PG_PARAMS, *_OPTIONS})
    return DatabaseSessionCache(base, **settings)


def open_tiered_postgres(url: str, options: dict[str, Any]) -> SessionCache:
    """``shm+postgresql://``: the host's segment in front of PostgreSQL, invalidations by
    LISTEN/NOTIFY, within ``max_staleness`` as ``shm+redis://``."""
    from ..tiered import TieredSessionCache
    from .cache import DatabaseSessionCache

    shm_params, tier_params = _open._SHM_PARAMS, _open._TIER_PARAMS
    base, ours = _split(url[len("shm+"):], {**_PG_PARAMS, **shm_params, **tier_params})
    settings = {**ours, **options}
    _open._check_options(url, settings, {*_PG_PARAMS, *shm_params, *tier_params, *_OPTIONS})
    name = settings.pop("shm", None)
    if not name:
        raise InvalidArgument(f"{redact(url)!r}: name the host's segment, e.g. ?shm=myapp")
    local_settings: dict[str, Any] = {
        k: settings.pop(k) for k in (*shm_params, "codec") if k in settings
    }
    tier_settings: dict[str, Any] = {
        k: settings.pop(k) for k in ("max_staleness", "subscribe", "user_id_of")
        if k in settings
    }
    if "codec" in local_settings:
        settings["codec"] = local_settings["codec"]
    if settings.get("clock") is not None:
        local_settings["clock"] = tier_settings["clock"] = settings["clock"]
    remote = DatabaseSessionCache(base, **settings)
    try:
        local = _open._shm_create_or_attach(name, local_settings)
    except BaseException:
        remote.close()
        raise
    try:
        return TieredSessionCache(local, remote, **tier_settings)
    except BaseException:
        local.close()
        remote.close()
        raise


OPENERS: dict[str, Callable[[str, dict[str, Any]], SessionCache]] = {
    "sqlite": open_sqlite,
    "postgresql": open_postgres,
    "postgres": open_postgres,
    "shm+postgresql": open_tiered_postgres,
    "shm+postgres": open_tiered_postgres,
}
