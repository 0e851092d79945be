"""Shared memory per session in each mode, and the cost of a big segment.

Bytes per session: what one more session of capacity costs in /dev/shm, measured as the
size difference of two segments whose capacities differ by 65,536; and the whole size over
the capacity (header and overflow slots included). Creation includes ``posix_fallocate``
of the whole segment (so a full /dev/shm fails then, not later).
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from shmcache import SharedMemorySessionCache

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
        size = cache.stats()["size_bytes"]
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
            "size_bytes": st["size_bytes"],
            "bytes_per_session": (st2["size_bytes"] - st["size_bytes"]) / cap,
            "size_over_capacity": st["size_bytes"] / cap,
            "bytes_per_slot": (st2["size_bytes"] - st["size_bytes"])
            / (st2["slots"] - st["slots"]),
        })
    big = []
    for vs in (0, 256):
        progress.step(f"create and attach a {cfg.big_capacity:,}-session segment, "
                      f"value_size={vs}")
        big.append(_big(cfg.big_capacity, vs))
    return {"per_mode": per_mode, "big": big}
