"""gunicorn server hooks: the master creates the segment before it forks its workers.

In ``gunicorn.conf.py``::

    from shmcache.gunicorn import child_exit, on_exit, on_starting  # noqa: F401

and in the app, wherever it builds its session cache::

    from shmcache.gunicorn import get_cache
    cache = get_cache()

Configuration: ``configure(name=..., capacity=..., value_size=..., codec=...,
user_id_of=...)`` in ``gunicorn.conf.py``, or the environment variables ``SHMCACHE_NAME``,
``SHMCACHE_CAPACITY`` and ``SHMCACHE_VALUE_SIZE``. The master exports ``SHMCACHE_NAME`` so
that every worker, forked or spawned, finds the same segment.

Why each hook:

* ``on_starting`` (master, once): create the segment, so forked workers inherit the mapping
  (and the lock inside it), even after dropping privileges. With ``preload_app`` or without.
* ``child_exit`` (master, after every worker exit, SIGKILL included): a worker killed by
  the timeout while it held the lock would make the others wait for the lock's own dead-owner
  detection; the master frees it at once and verifies the slot the worker was writing.
* ``on_exit`` (master, at shutdown): remove the name, unless another master (a binary
  upgrade) adopted the segment in the meantime.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import threading
from typing import Any

from ._errors import (
    IncompatibleSegment,
    InvalidArgument,
    SegmentExists,
    SegmentNotFound,
    SegmentPermissionError,
    ShmCacheError,
)
from ._protocol import UserIdOf
from .codecs import Codec, PickleCodec
from .shm.cache import SharedMemorySessionCache
from .shm.segment import normalize_name, unlink_name
from .shm.startup import attach_when_ready, create_or_attach

log = logging.getLogger("shmcache.gunicorn")

ENV_NAME = "SHMCACHE_NAME"
ENV_CAPACITY = "SHMCACHE_CAPACITY"
ENV_VALUE_SIZE = "SHMCACHE_VALUE_SIZE"

_settings: dict[str, Any] = {}
_cache: SharedMemorySessionCache | None = None
_guard = threading.Lock()


def configure(
    *,
    name: str | None = None,
    capacity: int | None = None,
    value_size: int | None = None,
    codec: Codec | None = None,
    user_id_of: UserIdOf | None = None,
) -> None:
    """Settings for the hooks and ``get_cache`` (keyword arguments win over ``SHMCACHE_*``)."""
    for key, value in (
        ("name", name), ("capacity", capacity), ("value_size", value_size), ("codec", codec),
        ("user_id_of", user_id_of),
    ):
        if value is not None:
            _settings[key] = value


def _options() -> dict[str, Any]:
    return {"codec": _settings.get("codec"), "user_id_of": _settings.get("user_id_of")}


def _int_setting(key: str, env: str, default: int) -> int:
    if key in _settings:
        return int(_settings[key])
    raw = os.environ.get(env)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{env} must be an integer, got {raw!r}") from None


def _name(server: Any = None) -> str:
    if "name" in _settings:
        return str(_settings["name"])
    if os.environ.get(ENV_NAME):
        return os.environ[ENV_NAME]
    if server is not None:
        # One segment per app by default: gunicorn's process name is the app module.
        proc = getattr(server.cfg, "proc_name", None) or "app"
        return "shmcache-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(proc))[:150]
    raise InvalidArgument(
        f"no segment name: call shmcache.gunicorn.configure(name=...) in gunicorn.conf.py "
        f"or set {ENV_NAME} (needed when the app calls get_cache() before on_starting)"
    )


def _attach_in_master(
    name: str, worker_uid: int, options: dict[str, Any]
) -> SharedMemorySessionCache:
    """Attach a segment made by a master we replace. That master handed it to its workers'
    user (gunicorn ``user=``): the segment is owned by that user, which this master trusts
    as its own workers' (the workers that read it run as that user; the master never reads
    a session), pickles included, as it did when it made it."""
    try:
        return attach_when_ready(name, **options)
    except SegmentPermissionError:
        if worker_uid == os.geteuid():
            raise
    trusted = {**options, "owner_uid": worker_uid}
    if trusted.get("codec") is None:
        # The default codec unpickles: allowed only where the caller names the writer it
        # trusts (construct.refuse_default_pickle) - here, its own workers' user.
        trusted["codec"] = PickleCodec()
    return attach_when_ready(name, **trusted)


def _open_in_master(name: str, worker_uid: int) -> SharedMemorySessionCache:
    capacity = _int_setting("capacity", ENV_CAPACITY, 65536)
    value_size = _int_setting("value_size", ENV_VALUE_SIZE, 0)
    options = _options()
    try:
        return SharedMemorySessionCache.create(name, capacity, value_size, **options)
    except SegmentExists:
        pass
    # The name is taken: by the master we are replacing (USR2 binary upgrade, both run side
    # by side for a while), by one starting at the same instant (wait until it has made
    # the segment whole), or by a master that crashed. Share it if its layout is ours.
    try:
        cache = _attach_in_master(name, worker_uid, options)
    except (IncompatibleSegment, SegmentNotFound) as exc:
        # Another layout version, or a segment whose creator died making it: never share
        # those. Take the name over (and an older version's semaphore beside it); processes
        # still mapping the old segment keep it.
        log.warning("shmcache: replacing segment %r (%s)", name, exc)
        unlink_name(name, os.geteuid())
        return SharedMemorySessionCache.create(name, capacity, value_size, **options)
    if cache.capacity != capacity or cache.value_size != value_size:
        log.warning(
            "shmcache: reusing segment %r with capacity %d and value size %d (configured: "
            "%d, %d); `shmcache unlink %s` between two stops to resize it",
            name, cache.capacity, cache.value_size, capacity, value_size, name,
        )
    cache.adopt()
    return cache


def on_starting(server: Any) -> None:
    """gunicorn hook (master): create the segment before any worker is forked."""
    global _cache
    name = normalize_name(_name(server))
    with _guard:
        existing = _cache
    if existing is not None and not existing.closed and existing.name == name:
        # preload_app imports the app before this hook: if it already called get_cache(),
        # that object is the one to keep (and to unlink at exit).
        cache: SharedMemorySessionCache | None = existing
        existing.adopt()
    else:
        cache = None
    uid, gid = getattr(server.cfg, "uid", os.geteuid()), getattr(server.cfg, "gid", os.getegid())
    if cache is None:
        cache = _open_in_master(name, uid)
    if uid != os.geteuid() or gid != os.getegid():
        cache.chown(uid, gid)  # workers drop to this user; spawned ones attach by name
    os.environ[ENV_NAME] = name
    with _guard:
        _cache = cache
    # gunicorn skips on_exit when it halts because workers failed to boot (the HaltServer
    # escapes its own halt()); the interpreter's exit still runs this.
    atexit.register(_cleanup_at_exit, os.getpid())
    server.log.info("shmcache: segment %r ready (capacity %d)", name, cache.capacity)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (master): a worker died; free the lock at once if it held it."""
    cache = _cache
    if cache is None or cache.closed:
        return
    try:
        if cache.recover_lock():
            server.log.warning(
                "shmcache: worker %s died holding the lock; recovered it", worker.pid
            )
    except ShmCacheError as exc:  # never let a cache problem break the arbiter
        server.log.error("shmcache: lock recovery after worker %s failed: %s", worker.pid, exc)


def on_exit(server: Any) -> None:
    """gunicorn hook (master, shutdown): remove the name unless another master adopted them."""
    global _cache
    with _guard:
        cache, _cache = _cache, None
    if cache is None or cache.closed:
        return
    try:
        if not cache.unlink_if_keeper():
            server.log.info("shmcache: segment %r kept for the master that adopted it", cache.name)
    finally:
        cache.close()


def _cleanup_at_exit(master_pid: int) -> None:
    global _cache
    if os.getpid() != master_pid:
        return  # a forked worker inherits the master's atexit handlers
    with _guard:
        cache, _cache = _cache, None
    if cache is None or cache.closed:
        return  # on_exit already did it
    with contextlib.suppress(ShmCacheError, OSError):
        cache.unlink_if_keeper()
    cache.close()


def get_cache() -> SharedMemorySessionCache:
    """This process's cache: the one call an app makes, whatever runs it.

    * a gunicorn worker (``preload_app`` or not, sync or ``uvicorn_worker.UvicornWorker``):
      the object the master created, inherited through fork;
    * a process that did not inherit it (uvicorn's own ``--workers``, which spawns; a script):
      attach by ``SHMCACHE_NAME``, creating the segment if nobody has. A segment created
      that way is not removed at exit: ``shmcache unlink NAME``, or create it beforehand
      with ``shmcache create NAME``.
    """
    global _cache
    with _guard:
        if _cache is not None and not _cache.closed:
            return _cache
        # Spawned workers all start at once: one creates, the others wait for it.
        cache = create_or_attach(
            _name(),
            _int_setting("capacity", ENV_CAPACITY, 65536),
            _int_setting("value_size", ENV_VALUE_SIZE, 0),
            **_options(),
        )
        _cache = cache
        return cache
