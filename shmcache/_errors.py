"""Every error shmcache raises on purpose.

Each one subclasses ``ShmCacheError`` *and* the builtin a caller would naturally catch
(the way filelock's ``Timeout`` is a ``TimeoutError``), so ``except FileNotFoundError``
and ``except ShmCacheError`` both work.
"""

from __future__ import annotations


class ShmCacheError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidArgument(ShmCacheError, ValueError):
    """An argument has the right type but a value we refuse (empty token, bad TTL...)."""


class InvalidType(ShmCacheError, TypeError):
    """An argument has the wrong type (a token that is not a ``str``...)."""


class SegmentExists(ShmCacheError, FileExistsError):
    """``create`` found the segment's name already taken."""


class SegmentNotFound(ShmCacheError, FileNotFoundError):
    """``attach`` found no segment by that name."""


class SegmentPermissionError(ShmCacheError, PermissionError):
    """The segment exists but we may not open it, or must not trust it.

    Raised for a segment owned by another user or writable by group/others: /dev/shm is
    world-writable, so anyone can create a name before the server does (a squat).
    """


class IncompatibleSegment(ShmCacheError):
    """The bytes behind the name are not a shmcache segment we can use.

    Wrong magic, another layout version, a size that does not match the header, a header
    that is not fully initialised, or a segment made in another pid namespace.
    """


class SecretMismatch(IncompatibleSegment):
    """A Redis prefix (or a database table) is already in use with another secret (its
    stored fingerprint is not this client's): hosts that share a prefix must share the
    secret, or a logout on one would not reach the others. The message names the prefix
    (the table), never a secret."""


class SegmentCorrupted(ShmCacheError):
    """A write found the segment damaged; ``check()`` says where."""


class NoSpace(ShmCacheError, OSError):
    """/dev/shm could not reserve the segment's memory (``posix_fallocate`` failed)."""


class LockTimeout(ShmCacheError, TimeoutError):
    """A live process has held the segment lock for longer than ``lock_timeout``."""


class CacheClosed(ShmCacheError, ValueError):
    """The cache object was closed in this process (like I/O on a closed file)."""


class CacheUnavailable(ShmCacheError, ConnectionError):
    """The cache's server (Redis) could not be reached, timed out, or refused the command.

    A cache opened with ``fail_open=True`` counts it and carries on in ``get`` (a miss) and
    ``set`` (nothing stored); ``invalidate`` and ``clear`` always raise it, because a logout
    that did not reach the server must never be reported as done.
    """

    code: str = ""  # the server's error code if it refused ("READONLY"...); "": no reply


__all__ = [
    "CacheClosed",
    "CacheUnavailable",
    "IncompatibleSegment",
    "InvalidArgument",
    "InvalidType",
    "LockTimeout",
    "NoSpace",
    "SecretMismatch",
    "SegmentCorrupted",
    "SegmentExists",
    "SegmentNotFound",
    "SegmentPermissionError",
    "ShmCacheError",
]
