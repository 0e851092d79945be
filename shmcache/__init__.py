"""shmcache: a session cache shared by every worker process on one host.

A fixed-size hash table in a named POSIX shared-memory segment, guarded by a lock inside it
that the kernel frees when its holder dies, behind the ``SessionCache`` protocol of the seed app, so
that a logout seen by one gunicorn worker is seen by all.

Beyond one host, ``RedisSessionCache``, ``DatabaseSessionCache`` (SQLite or PostgreSQL) and
``TieredSessionCache`` (the shared-memory table in front of Redis or PostgreSQL) implement the
same protocol, and ``open_cache(url)`` chooses a backend from one configuration string.
"""

from ._errors import (
    CacheClosed,
    CacheUnavailable,
    IncompatibleSegment,
    InvalidArgument,
    InvalidType,
    LockTimeout,
    NoSpace,
    SecretMismatch,
    SegmentCorrupted,
    SegmentExists,
    SegmentNotFound,
    SegmentPermissionError,
    ShmCacheError,
)
from ._open import open_cache
from ._protocol import SessionCache, UserSessionCache
from .codecs import Codec, JsonCodec, PickleCodec, PydanticCodec
from .memory import InMemorySessionCache, NoOpSessionCache
from .redis.cache import RedisSessionCache
from .shm.cache import SharedMemorySessionCache
from .sql.cache import DatabaseSessionCache
from .tiered import TieredSessionCache

__version__ = "0.1.0"

__all__ = [
    "CacheClosed",
    "CacheUnavailable",
    "Codec",
    "DatabaseSessionCache",
    "InMemorySessionCache",
    "IncompatibleSegment",
    "InvalidArgument",
    "InvalidType",
    "JsonCodec",
    "LockTimeout",
    "NoOpSessionCache",
    "NoSpace",
    "PickleCodec",
    "PydanticCodec",
    "RedisSessionCache",
    "SecretMismatch",
    "SegmentCorrupted",
    "SegmentExists",
    "SegmentNotFound",
    "SegmentPermissionError",
    "SessionCache",
    "SharedMemorySessionCache",
    "ShmCacheError",
    "TieredSessionCache",
    "UserSessionCache",
    "open_cache",
]
