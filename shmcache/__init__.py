"""shmcache: a session cache shared by every worker process on one host.

A fixed-size hash table in a named POSIX shared-memory segment, guarded by a semaphore that
survives the death of its holder, behind the ``SessionCache`` protocol of the seed app, so
that a logout seen by one gunicorn worker is seen by all.
"""

from ._errors import (
    CacheClosed,
    IncompatibleSegment,
    InvalidArgument,
    InvalidType,
    LockTimeout,
    NoSpace,
    SegmentCorrupted,
    SegmentExists,
    SegmentNotFound,
    SegmentPermissionError,
    ShmCacheError,
)
from ._memory import InMemorySessionCache, NoOpSessionCache
from ._protocol import SessionCache
from ._shm import SharedMemorySessionCache
from .codecs import Codec, JsonCodec, PickleCodec

__version__ = "0.1.0"

__all__ = [
    "CacheClosed",
    "Codec",
    "InMemorySessionCache",
    "IncompatibleSegment",
    "InvalidArgument",
    "InvalidType",
    "JsonCodec",
    "LockTimeout",
    "NoOpSessionCache",
    "NoSpace",
    "PickleCodec",
    "SegmentCorrupted",
    "SegmentExists",
    "SegmentNotFound",
    "SegmentPermissionError",
    "SessionCache",
    "SharedMemorySessionCache",
    "ShmCacheError",
]
