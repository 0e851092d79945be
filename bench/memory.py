"""Shared memory per session in each mode, what a stored value adds, and the cost of a big
segment.

The table (fixed when the segment is made): what one more session of capacity costs in
/dev/shm, measured as the difference in reserved bytes (``stats()["committed_bytes"]``,
what ``posix_fallocate`` reserved: the kernel's own count) of two segments whose
capacities differ by 65,536, and the whole over the capacity. Creation includes
``posix_fallocate`` of the table (so a full /dev/shm fails then, not later).

Values (variable, layout 5): the arena's pages are reserved as values fill them, so what a
stored session adds is measured by storing the seed app's pydantic ``Session`` (pickled,
and through ``PydanticCodec``) into a ``value_size=4096`` segment: the growth of the
segment's allocated blocks (``st_blocks`` of /dev/shm/NAME) divided by the sessions stored,
beside the encoded size.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from typing import Any

from shmcache import PydanticCodec, SharedMemorySessionCache
from shmcache.shm.segment import segment_path

from .backends import segment_name
from .config import Config
from .progress import Progress

MODES = (0, 64, 256)


def _attach_elsewhere(name: str, conn: Any) -> None:
    """Attach in a fresh (forked) process, as a worker would; send the seconds it took."""
    try:
        t0 = time.perf_counter()
        cache = SharedMemorySessionCache.attach(name)
        dt = time.perf_counter() - t0
        cache.close()
        conn.send(dt)
    except BaseException as exc:
        conn.send(repr(exc))
    finally:
        conn.close()


def _big(capacity: int, value_size: int) -> dict[str, Any]:
    name = segment_name("big")
    t0 = time.perf_counter()
    cache = SharedMemorySessionCache.create(name, capacity=capacity, value_size=value_size)
    created = time.perf_counter() - t0
    try:
        size = cache.stats()["committed_bytes"]
        t0 = time.perf_counter()
        other = SharedMemorySessionCache.attach(name)
        attached = time.perf_counter() - t0
        other.close()
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_attach_elsewhere, args=(name, child))
        proc.start()
        child.close()
        elsewhere = parent.recv()
        proc.join()
    finally:
        cache.unlink()
        cache.close()
    return {
        "capacity": capacity,
        "value_size": value_size,
        "size_bytes": size,
        "create_s": created,
        "attach_s": attached,
        "attach_other_process_s": elsewhere,
    }


def _stats(capacity: int, value_size: int) -> dict[str, Any]:
    with SharedMemorySessionCache.create(segment_name("mem"), capacity=capacity,
                                         value_size=value_size) as cache:
        try:
            return cache.stats()
        finally:
            cache.unlink()


VALUE_SESSIONS = 20_000


def _values(codec_name: str) -> dict[str, Any]:
    """Store the seed app's Session VALUE_SESSIONS times; what /dev/shm allocated per one."""
    from .models import Session

    codec = PydanticCodec(Session) if codec_name == "pydantic" else None
    name = segment_name("values")
    sessions = [
        Session(id=i, token=f"{i:010d}" + "k" * 33, created_at="2026-11-29T10:00:00.123456",
                expires_at="2026-12-29T10:00:00.123456")
        for i in range(VALUE_SESSIONS)
    ]
    encoded = len(codec.encode(sessions[0]) if codec else pickle.dumps(
        sessions[0], pickle.HIGHEST_PROTOCOL))
    with SharedMemorySessionCache.create(name, capacity=VALUE_SESSIONS, value_size=4096,
                                         codec=codec) as cache:
        try:
            before = os.stat(segment_path(name)).st_blocks * 512
            for i, session in enumerate(sessions):
                cache.set(f"tok-{i}", session, 3600)
            after = os.stat(segment_path(name)).st_blocks * 512
            stats = cache.stats()
        finally:
            cache.unlink()
    per_session = (after - before) / VALUE_SESSIONS
    return {
        "codec": codec_name,
        "sessions": VALUE_SESSIONS,
        "encoded_bytes": encoded,
        "bytes_per_session": per_session,
        "over_encoding": per_session - encoded,
        "value_bytes": stats["value_bytes"],
        "table_bytes": before,
        "not_stored": stats["oversize"] + stats["arena_full"],
    }


def run(cfg: Config, progress: Progress) -> dict[str, Any]:
    per_mode = []
    for vs in MODES:
        progress.step(f"segment size, value_size={vs}")
        cap = 65536
        st, st2 = _stats(cap, vs), _stats(2 * cap, vs)
        per_mode.append({
            "value_size": vs,
            "capacity": cap,
            "slots": st["slots"],
            "size_bytes": st["committed_bytes"],
            "bytes_per_session": (st2["committed_bytes"] - st["committed_bytes"]) / cap,
            "size_over_capacity": st["committed_bytes"] / cap,
            "bytes_per_slot": (st2["committed_bytes"] - st["committed_bytes"])
            / (st2["slots"] - st["slots"]),
        })
    values = []
    for codec_name in ("pickle", "pydantic"):
        progress.step(f"what a stored session adds, {codec_name}")
        values.append(_values(codec_name))
    big = []
    for vs in (0, 256):
        progress.step(f"create and attach a {cfg.big_capacity:,}-session segment, "
                      f"value_size={vs}")
        big.append(_big(cfg.big_capacity, vs))
    return {"per_mode": per_mode, "values": values, "big": big}
