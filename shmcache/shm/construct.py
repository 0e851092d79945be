"""Making and opening a segment for ``SharedMemorySessionCache``: the checks that come
before a single offset read from it is trusted.

Layer: between the OS layer (``segment``, ``proc``, ``mutex``) and the cache class, which
calls :func:`create_segment` and :func:`attach_segment`; it knows no session.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from .._errors import IncompatibleSegment, InvalidArgument, ShmCacheError
from ..codecs import Codec
from . import mutex as _mutex
from . import proc as _proc
from . import segment as _segment
from .layout import W_KEEPER, Geometry, HeaderInfo, host_supported, read_header
from .lock import SegmentLock


def create_segment(
    name: str, capacity: int, value_size: int, codec: Codec | None, mode: int
) -> tuple[_segment.Segment, HeaderInfo]:
    """Create the name exclusively, owner-only by default, and write a whole header (the
    magic last) and an initialised lock before anyone can attach."""
    bare = _segment.normalize_name(name)
    _check_host()
    geo = Geometry.for_capacity(capacity, value_size)
    if not isinstance(mode, int) or mode & ~0o777:
        raise InvalidArgument(f"mode must be permission bits like 0o600, got {mode!r}")
    if mode & 0o022:
        refuse_default_pickle(geo.value_size, codec, f"mode {mode:#o} lets others write it")
    info = HeaderInfo(
        geo,
        secrets.randbits(64),
        secrets.randbits(64),
        os.getpid(),
        os.geteuid(),
        time.time(),
        _proc.pid_namespace(),
        _proc.time_namespace(),
        _mutex.probe(),
    )

    def init(mm: Any) -> None:
        header = geo.pack_header(info)
        SegmentLock.initialize(mm)
        mm[8 : len(header)] = header[8:]
        mm[0:8] = header[:8]  # the magic last: a half-made header never looks valid

    segment = _segment.create(bare, geo.size, mode, init, reserve=geo.reserved_at_creation)
    segment_words = memoryview(segment.mm).cast("B").cast("Q")
    segment_words[W_KEEPER] = _proc.my_word()
    segment_words.release()
    return segment, info


def attach_segment(
    name: str, codec: Codec | None, owner_uid: int | None, allow_writable_by_others: bool
) -> tuple[_segment.Segment, HeaderInfo]:
    """Open ``name`` after the owner and mode checks of ``segment.attach``, then validate
    the header, the namespaces, the lock's C library and the pickle rule."""
    bare = _segment.normalize_name(name)
    _check_host()
    segment = _segment.attach(
        bare, owner_uid=owner_uid, allow_writable_by_others=allow_writable_by_others
    )
    try:
        info = read_header(segment.mm, len(segment.mm))
        _check_namespaces(bare, info)
        if info.lock_abi != _mutex.probe():
            raise IncompatibleSegment(
                f"segment {bare!r} was made by a process with another C library (lock ABI "
                f"{info.lock_abi}, here {_mutex.probe()}): its lock means nothing here"
            )
        st = os.fstat(segment.fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            refuse_default_pickle(
                info.geometry.value_size, codec, f"segment {bare!r} can be written by another user"
            )
    except BaseException:
        segment.close()
        raise
    return segment, info


def _check_namespaces(name: str, info: HeaderInfo) -> None:
    here = _proc.pid_namespace()
    if info.pidns and here and info.pidns != here:
        raise IncompatibleSegment(
            f"segment {name!r} was created in another pid namespace: process ids in it "
            "would mean nothing here (share the host's pid namespace)"
        )
    # Expiry times are CLOCK_MONOTONIC, which another time namespace offsets: a session
    # expired here could look valid there (unshare --time). Refused rather than translated.
    here = _proc.time_namespace()
    if info.timens and here and info.timens != here:
        raise IncompatibleSegment(
            f"segment {name!r} was created in another time namespace: its expiry times "
            "(CLOCK_MONOTONIC) would be wrong here (share the host's time namespace)"
        )


def refuse_default_pickle(value_size: int, codec: Codec | None, why: str) -> None:
    """Unpickling runs code: never by default from a segment someone else can write."""
    if value_size and codec is None:
        raise InvalidArgument(
            f"{why}: values would be unpickled from it, and whoever can write it could run "
            "code in this process; pass codec=JsonCodec() (or another codec you trust)"
        )


def _check_host() -> None:
    if not host_supported():
        raise ShmCacheError("shmcache needs a little-endian host (x86-64, aarch64)")
