"""Create-or-attach for processes that start together (the shm backend's construction layer).

Every path that opens a segment by name without knowing whether it exists goes through
here: ``open_cache("shm://...")``, ``shm+redis://``, ``shmcache.gunicorn.get_cache()`` and the
master's ``on_starting``. uvicorn's own ``--workers`` starts all its workers at once: one of
them creates the segment, and for a few milliseconds the others find it half made (no
memory reserved yet, or no header). Attaching once and giving up failed 22 of 40
starts of a 4-process race (issue 12); here the others wait for the creator, for at most
``patience`` seconds, and only a name that is *not* being created fails at once.

Above ``cache.py`` (it uses the cache's public ``create``/``attach``); below the integrations.
"""

from __future__ import annotations

import time
from typing import Any

from .._errors import IncompatibleSegment, SegmentExists, SegmentNotFound
from . import segment as _segment
from .cache import SharedMemorySessionCache

# A creator reserves all its memory before it writes the header: a segment of
# a million sessions takes ~0.2 s here, so this leaves a wide margin on a loaded machine.
CREATION_PATIENCE = 10.0  # seconds
_RETRY_PAUSE = 0.01

_ATTACH_ONLY = ("owner_uid", "allow_writable_by_others")
_CREATE_ONLY = ("mode",)


def attach_when_ready(
    name: str, *, patience: float = CREATION_PATIENCE, **options: Any
) -> SharedMemorySessionCache:
    """``attach``, waiting up to ``patience`` seconds while another process is still
    creating the segment; any other refusal is raised at once."""
    bare = _segment.normalize_name(name)
    deadline = time.monotonic() + patience
    looked_again = False
    while True:
        try:
            return SharedMemorySessionCache.attach(bare, **options)
        except (SegmentNotFound, IncompatibleSegment):
            state = _segment.creation_state(bare)
            if state == "missing" or time.monotonic() > deadline:
                raise
            if state == "other":
                if looked_again:
                    raise  # a foreign file, another layout version...: waiting will not help
                looked_again = True  # its creator may have finished since attach looked
                continue
        looked_again = False
        time.sleep(_RETRY_PAUSE)


def create_or_attach(
    name: str,
    capacity: int,
    value_size: int,
    *,
    patience: float = CREATION_PATIENCE,
    **options: Any,
) -> SharedMemorySessionCache:
    """Attach to ``name``, or create it if nobody has: any number of processes calling this
    at once all get the same segment (the geometry is the creator's; compare it if it
    matters). ``options`` go to ``attach`` and ``create`` (``mode`` to ``create`` only,
    ``owner_uid``/``allow_writable_by_others`` to ``attach`` only)."""
    attach_options = {k: v for k, v in options.items() if k not in _CREATE_ONLY}
    create_options = {k: v for k, v in options.items() if k not in _ATTACH_ONLY}
    bare = _segment.normalize_name(name)
    deadline = time.monotonic() + patience
    looked_again = False
    while True:
        try:
            return SharedMemorySessionCache.attach(bare, **attach_options)
        except (SegmentNotFound, IncompatibleSegment) as exc:
            last: Exception = exc
            state = _segment.creation_state(bare)
            if state == "other":
                if looked_again:
                    raise  # a foreign file, another layout version...: waiting will not help
                looked_again = True  # its creator may have finished since attach looked
                continue
        looked_again = False
        if state == "missing":
            try:
                return SharedMemorySessionCache.create(
                    bare, capacity, value_size, **create_options
                )
            except SegmentExists as exc:  # somebody else is creating it: wait for them
                last = exc
        if time.monotonic() > deadline:
            raise last
        time.sleep(_RETRY_PAUSE)
