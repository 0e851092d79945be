"""Table behaviour: cost of get and set as the table fills, and under sustained churn.

Measured on a value-mode segment, because that is the mode whose ``get`` probes the table
(a hash-only ``get`` either hits the per-process map after one check-word load or misses
without probing). Three figures at each point, ns per call, median over batches:

* ``get_miss``: a token that is not there, so the whole 96-slot window is scanned;
* ``get_first_read``: a live token this process has not read yet (probe, verify, decode);
* ``set``: insert a new token (the lock, a window scan, a slot write), then removed again.

Churn keeps the table at capacity while it sets a new token and invalidates the oldest,
millions of times: with no tombstones, the figures at the end should match the start.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from shmcache import SharedMemorySessionCache

from .backends import VALUE_SIZE, segment_name
from .config import Config
from .progress import Progress
from .stats import batches, summary
from .workload import TTL, chunks, session, tokens


class _Probe:
    """Times the three figures on a segment, with fresh readers for first reads."""

    def __init__(self, cache: SharedMemorySessionCache, cfg: Config) -> None:
        self.cache, self.cfg = cache, cfg
        self.absent = chunks(tokens(cfg.batch * 20), cfg.batch)
        self.fresh = chunks(tokens(cfg.batch * 20), cfg.batch)
        self.fresh_sessions = [[session(t) for t in c] for c in self.fresh]

    def measure(self, live: collections.deque[str]) -> dict[str, Any]:
        cfg, pc = self.cfg, time.perf_counter_ns
        seconds = cfg.op_seconds / 2
        get = self.cache.get

        def miss(i: int) -> float:
            c = self.absent[i % len(self.absent)]
            t0 = pc()
            for t in c:
                get(t)
            return (pc() - t0) / len(c)

        # A reader that has never read these tokens: each get probes and decodes.
        reader = SharedMemorySessionCache.attach(self.cache.name)
        pool = list(live)
        step = max(1, len(pool) // (cfg.max_batches * cfg.batch))
        sample = chunks(pool[::step], cfg.batch)

        def first(i: int) -> float:
            c = sample[i % len(sample)]
            t0 = pc()
            for t in c:
                reader.get(t)
            return (pc() - t0) / len(c)

        set_, inval = self.cache.set, self.cache.invalidate

        def insert(i: int) -> float:
            c, s = self.fresh[i % len(self.fresh)], self.fresh_sessions[i % len(self.fresh)]
            t0 = pc()
            for t, v in zip(c, s, strict=True):
                set_(t, v, TTL)
            dt = pc() - t0
            for t in c:
                inval(t)
            return dt / len(c)

        try:
            out = {
                "get_miss": summary(batches(miss, seconds, self.cfg.min_batches,
                                            self.cfg.max_batches)),
                # each sample chunk is read once: later passes would hit the reader's map
                "get_first_read": summary(batches(first, seconds, 1, len(sample))),
                "set": summary(batches(insert, seconds, self.cfg.min_batches,
                                       self.cfg.max_batches)),
            }
        finally:
            reader.close()
        return out


def _fill(cache: SharedMemorySessionCache, live: collections.deque[str], upto: int) -> float:
    """Set new tokens until ``upto`` are live; ns per set (0 when nothing to add)."""
    new = tokens(max(0, upto - len(live)))
    t0 = time.perf_counter_ns()
    for i, t in enumerate(new):
        cache.set(t, session(t, i), TTL)
    dt = time.perf_counter_ns() - t0
    live.extend(new)
    return dt / len(new) if new else 0.0


def _figures(cache: SharedMemorySessionCache) -> dict[str, Any]:
    st = cache.stats()
    return {k: st[k] for k in ("entries", "load_factor", "evictions", "slots", "window")}


def run(cfg: Config, progress: Progress) -> dict[str, Any]:
    cap = cfg.table_capacity
    cache = SharedMemorySessionCache.create(
        segment_name("table"), capacity=cap, value_size=VALUE_SIZE
    )
    live: collections.deque[str] = collections.deque()
    try:
        probe = _Probe(cache, cfg)
        levels = []
        for frac in cfg.load_levels:
            progress.step(f"filling to {frac:.0%} of capacity {cap}")
            fill_ns = _fill(cache, live, round(frac * cap))
            progress.step(f"measuring at {frac:.0%} of capacity")
            levels.append({"fraction": frac, "fill_set_ns": fill_ns, **_figures(cache),
                           **probe.measure(live)})
        churn = _churn(cache, live, probe, cfg, progress.step)
        problems = cache.check()
    finally:
        cache.unlink()
        cache.close()
    return {
        "capacity": cap,
        "value_size": VALUE_SIZE,
        "levels": levels,
        "churn": churn,
        "check_after": problems,
    }


def _churn(
    cache: SharedMemorySessionCache,
    live: collections.deque[str],
    probe: _Probe,
    cfg: Config,
    step: Callable[[str], None],
) -> dict[str, Any]:
    """Set a new token and invalidate the oldest, ``cfg.churn_ops`` calls in all."""
    per_checkpoint = max(2, cfg.churn_ops // cfg.churn_checkpoints // 2)
    points = [{"ops": 0, "churn_ns_per_op": None, **_figures(cache), **probe.measure(live)}]
    set_, inval = cache.set, cache.invalidate
    done = 0
    for k in range(cfg.churn_checkpoints):
        step(f"churn {k + 1}/{cfg.churn_checkpoints} ({done:,} ops so far)")
        new = tokens(per_checkpoint)
        sessions = [session(t) for t in new]
        t0 = time.perf_counter_ns()
        for t, s in zip(new, sessions, strict=True):
            set_(t, s, TTL)
            live.append(t)
            inval(live.popleft())
        dt = time.perf_counter_ns() - t0
        done += 2 * per_checkpoint
        points.append({"ops": done, "churn_ns_per_op": dt / (2 * per_checkpoint),
                       **_figures(cache), **probe.measure(live)})
    first, last = points[0], points[-1]
    return {
        "ops": done,
        "points": points,
        "drift": {k: last[k]["median"] / first[k]["median"]
                  for k in ("get_miss", "get_first_read", "set")},
    }
