"""Which implementation runs a ``SharedMemorySessionCache``'s hot paths: the compiled core
(``_fast.c``, optional) or the pure-Python code of ``table.py``/``lock.py``/``cache.py``,
which is the reference and the fallback.

Layer: beside ``cache.py`` (it hands the core the cache's table geometry, seeds, codec,
clock and leases); it knows no more of sessions than the cache does.

The choice is made for each cache object when it is made: the compiled core if it was built
and ``SHMCACHE_PURE_PYTHON`` is unset, empty or ``0``; pure Python otherwise. Both follow
the same layout and lock protocol, so processes using either share one segment.
"""

from __future__ import annotations

import os
import pickle
import time
from typing import TYPE_CHECKING, Any

import xxhash

from .. import _errors
from .._args import ttl as ttl_arg
from .._args import user_key
from .._leases import _MAX_PER_THREAD
from ..codecs import PickleCodec
from . import layout
from .local import _canonical

if TYPE_CHECKING:
    from .cache import SharedMemorySessionCache

ENV = "SHMCACHE_PURE_PYTHON"

_fast: Any
try:
    from . import _fast  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # not built (no compiler at install time), or another platform
    _fast = None
    UNAVAILABLE = f"the compiled extension is not built ({exc})"
else:
    UNAVAILABLE = ""
    # The C file mirrors these numbers of layout.py: refuse it if they ever differ.
    _MIRRORED = {
        "LAYOUT_VERSION": layout.LAYOUT_VERSION, "W_WRITING": layout.W_WRITING,
        "W_GEN": layout.W_GEN, "W_JOURNAL": layout.W_JOURNAL,
        "W_EVICTIONS": layout.W_EVICTIONS, "W_RECOVERIES": layout.W_RECOVERIES,
        "W_OVERSIZE": layout.W_OVERSIZE, "W_CLEARED_AT": layout.W_CLEARED_AT,
        "W_LEASE_DROPS": layout.W_LEASE_DROPS, "MUTEX_OFFSET": layout.MUTEX_OFFSET,
        "TAG_SIZE": layout.TAG_SIZE, "NONCE_BITS": layout.NONCE_BITS,
        "CHECK_HASH_BITS": layout.CHECK_HASH_BITS, "MAX_EXPIRY_MS": layout.MAX_EXPIRY_MS,
        "UNIT": layout.UNIT, "OP_SLOT": layout.OP_SLOT,
    }
    _differ = [k for k, v in _MIRRORED.items() if getattr(_fast, k) != v]
    if _differ:
        UNAVAILABLE = f"the compiled extension was built for another layout ({_differ})"
        _fast = None


def compiled_available() -> bool:
    """True if the compiled core is importable and matches this layout."""
    return _fast is not None


def pure_python_forced() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def implementation() -> str:
    """What a cache object made now would use: ``"c"`` or ``"python"``."""
    return "c" if _fast is not None and not pure_python_forced() else "python"


def make_core(cache: SharedMemorySessionCache) -> Any | None:
    """The compiled core of ``cache``, or None for pure Python. Called once, at the end of
    the cache's ``__init__``; the cache then binds ``get``/``set``/``invalidate``/
    ``invalidate_by_user`` to the core's methods."""
    if implementation() != "c":
        return None
    table = cache._table
    geo = table.geometry
    codec = cache._codec
    encode: Any = None if codec is None else codec.encode
    decode: Any = None if codec is None else codec.decode
    encode_arg: Any = None
    if type(codec) is PickleCodec:  # its methods are these calls: skip their Python frames
        encode, encode_arg, decode = pickle.dumps, pickle.HIGHEST_PROTOCOL, pickle.loads
    return _fast.Core(
        cache,
        cache._segment.mm,
        (
            geo.nslots, geo.window, geo.physical_slots, geo.value_size, geo.max_units,
            geo.record_stride, geo.tags_offset, geo.checks_offset, geo.users_offset,
            geo.records_offset, geo.leases_offset, geo.lease_buckets, geo.arena_ctl_offset,
            geo.arena_offset, geo.arena_bytes,
        ),
        (cache._info.tag_seed, cache._info.check_seed),
        (
            xxhash.xxh3_128_digest, xxhash.xxh3_64_intdigest, pickle.dumps, _canonical,
            ttl_arg, user_key, table.repair_locked,
            None if table.arena is None else table.arena.alloc_locked,
        ),
        (
            _errors.InvalidType, _errors.InvalidArgument, _errors.CacheClosed,
            _errors.ShmCacheError, _errors.LockTimeout, _errors.SegmentCorrupted,
        ),
        (
            cache._local,
            None if cache._clock is time.monotonic else cache._clock,  # C reads it itself
            encode,
            encode_arg,
            decode,
            cache._user_id_of,
            cache._leases._tls,
        ),
        (cache._lock.timeout, cache._leases.timeout, cache._max_local, _MAX_PER_THREAD),
    )
