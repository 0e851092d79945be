"""Single process: ns per call of get-hit, get-miss, set and invalidate, every backend.

One sample is the mean over a batch of distinct tokens (so the table's memory is touched
the way a server touches it, not one hot cache line), minus the bare loop's cost. Backends
are measured in interleaved rounds, so the VM's drift during the run hits them all alike.
``set`` inserts a token that is not there and ``invalidate`` removes it again, so the table
stays at the same load throughout. ``invalidate_absent`` is a logout of a token the cache
does not hold (its TTL ran out since login, the common case with short TTLs).

The value-mode segment and the shared peers are also read from a forked process that did
not set the sessions (a worker reading another worker's login); that child times the seed's
in-memory cache on the same tokens too, so its ratio comes from one process and one moment.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

from .backends import Backend, Resources, Store
from .config import Config
from .progress import Progress
from .stats import batches, loop_overhead_ns, ratio, summary
from .workload import TTL, chunks, session, tokens

OPS = ("get_hit", "get_miss", "set", "invalidate", "invalidate_absent")
_SLOW_NS = 20_000


def _preload(cache: Any, pool: list[str]) -> None:
    for i, t in enumerate(pool):
        cache.set(t, session(t, i), TTL)


def _timed_get(cache: Any, chunk_list: list[list[str]], overhead: float,
               method: str = "get") -> Callable[[int], float]:
    get = getattr(cache, method)
    pc = time.perf_counter_ns

    def run(i: int) -> float:
        chunk = chunk_list[i % len(chunk_list)]
        t0 = pc()
        for t in chunk:
            get(t)
        return (pc() - t0) / len(chunk) - overhead

    return run


def _shifted(fn: Callable[[int], float], start: int) -> Callable[[int], float]:
    """``fn`` with batch numbers continuing from an earlier round (so chunks keep cycling)."""
    return lambda i: fn(start + i)


def _hit_rate(cache: Any, pool: list[str]) -> float:
    sample = pool[:: max(1, len(pool) // 200)]
    return sum(cache.get(t) is not None for t in sample) / len(sample)


class _Backend:
    """One backend's cache, token pools and samples during the interleaved rounds.

    A backend whose set takes more than ``_SLOW_NS`` (a server or a disk behind it) gets a
    smaller pool and batch, so that its minimum number of batches fits in the time budget;
    per-call figures do not depend on either.
    """

    def __init__(self, backend: Backend, store: Store, cfg: Config, pools: dict[str, Any]):
        self.backend, self.store = backend, store
        self.cache = store.open()
        hit: list[str] = pools["hit"]
        t0 = time.perf_counter_ns()
        _preload(self.cache, hit[:20])
        slow = (time.perf_counter_ns() - t0) / 20 > _SLOW_NS
        self.batch = max(5, cfg.batch // 5) if slow else cfg.batch
        self.pool = hit[: min(len(hit), 1000)] if slow else hit
        _preload(self.cache, self.pool[20:])
        self.hit_chunks = chunks(self.pool, self.batch)
        self.miss_chunks = chunks(pools["miss"], self.batch)
        self.fresh = chunks(pools["fresh"], self.batch)
        self.sessions = [[session(t) for t in c] for c in self.fresh]
        self.samples: dict[str, list[float]] = {op: [] for op in OPS}
        self.offset: dict[str, int] = dict.fromkeys(OPS, 0)

    def set_invalidate(self, overhead: float) -> Callable[[int], float]:
        cache, pc = self.cache, time.perf_counter_ns
        set_, inval = cache.set, cache.invalidate
        inval_samples = self.samples["invalidate"]

        def run(i: int) -> float:
            chunk = self.fresh[i % len(self.fresh)]
            sessions = self.sessions[i % len(self.fresh)]
            t0 = pc()
            for t, s in zip(chunk, sessions, strict=True):
                set_(t, s, TTL)
            t1 = pc()
            for t in chunk:
                inval(t)
            inval_samples.append((pc() - t1) / len(chunk) - overhead)
            return (t1 - t0) / len(chunk) - overhead

        return run


def _other_process(
    store: Store, hit_chunks: list[list[str]], cfg: Config, overhead: float, conn: Any
) -> None:
    """In a forked child: read sessions another process set, beside a local in-memory
    cache holding the same tokens."""
    from .seed import InMemorySessionCache

    try:
        cache = store.open()
        pool = [t for c in hit_chunks for t in c]
        # First reads (a value-mode segment decodes here, then remembers the object).
        first = batches(_timed_get(cache, hit_chunks, overhead), cfg.op_seconds, 1,
                        len(hit_chunks))
        for c in hit_chunks:  # whatever the time budget left unread: read it once
            for t in c:
                cache.get(t)
        base = InMemorySessionCache()
        _preload(base, pool)
        steady: list[float] = []
        local: list[float] = []
        rounds = 5
        for _ in range(rounds):
            steady += batches(_timed_get(cache, hit_chunks, overhead), cfg.op_seconds / rounds,
                              max(1, cfg.min_batches // rounds), cfg.max_batches // rounds)
            local += batches(_timed_get(base, hit_chunks, overhead), cfg.op_seconds / rounds,
                             max(1, cfg.min_batches // rounds), cfg.max_batches // rounds)
        conn.send({
            "first_read": summary(first),
            "get_hit": summary(steady),
            "inmemory_get_hit": summary(local),
            "hit_rate": _hit_rate(cache, pool),
        })
    except BaseException as exc:  # the parent reports it; a child must never hang it
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def _measure_other(
    store: Store, hit_chunks: list[list[str]], cfg: Config, overhead: float
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_other_process, args=(store, hit_chunks, cfg, overhead, child))
    proc.start()
    child.close()
    try:
        result: dict[str, Any] = parent.recv()
    except EOFError:
        result = {"error": f"child exited with status {proc.exitcode}"}
    proc.join()
    return result


def run(cfg: Config, backends: list[Backend], res: Resources, progress: Progress) -> dict[str, Any]:
    pools: dict[str, Any] = {
        "hit": tokens(cfg.tokens),
        "fresh": tokens(max(cfg.batch * 8, min(cfg.tokens, 4000))),
        "miss": tokens(max(cfg.batch * 8, cfg.tokens // 4)),
    }
    overhead = loop_overhead_ns(pools["hit"], cfg.batch)

    states: list[_Backend] = []
    results: dict[str, Any] = {}
    try:
        for b in backends:
            progress.step(f"{b.label}: opening and loading {cfg.tokens} sessions")
            try:
                store = b.make(res)
            except Exception as exc:  # e.g. redis-server would not start: skip, say why
                progress.note(f"skipped {b.label}: {exc!r}")
                results[b.key] = {"label": b.label, "skipped": repr(exc)}
                continue
            states.append(_Backend(b, store, cfg, pools))

        rounds = 1 if cfg.name == "smoke" else 5
        per_round = cfg.op_seconds / rounds
        lo, hi = max(1, cfg.min_batches // rounds), max(1, cfg.max_batches // rounds)
        for op in ("get_hit", "get_miss", "set", "invalidate_absent"):
            for r in range(rounds):
                for st in states:
                    progress.step(f"{op} round {r + 1}/{rounds}: {st.backend.label}")
                    if op == "set":
                        fn = st.set_invalidate(overhead)
                    elif op == "invalidate_absent":
                        fn = _timed_get(st.cache, st.miss_chunks, overhead, "invalidate")
                    else:
                        fn = _timed_get(st.cache,
                                        st.hit_chunks if op == "get_hit" else st.miss_chunks,
                                        overhead)
                    got = batches(_shifted(fn, st.offset[op]), per_round, lo, hi)
                    st.offset[op] += len(got)
                    st.samples[op] += got

        for st in states:
            b = st.backend
            row: dict[str, Any] = {
                "label": b.label, "impl": st.store.impl, "shared": st.store.shared,
                "ops": {op: summary(st.samples[op]) for op in OPS},
                "hit_rate": _hit_rate(st.cache, st.pool),
                "batch": st.batch, "pool": len(st.pool),
            }
            if st.store.shared:
                progress.step(f"{b.label}: get-hit in a process that did not set")
                st.store.before_fork()
                row["other_process"] = _measure_other(st.store, st.hit_chunks, cfg, overhead)
            results[b.key] = row
    finally:
        for st in states:
            st.store.destroy()

    _add_ratios(results)
    return {
        "method": "ns per call, mean over a batch of distinct tokens, minus the bare loop; "
                  "median and p99 over batches; backends interleaved in rounds",
        "batch": cfg.batch,
        "tokens": cfg.tokens,
        "loop_overhead_ns": overhead,
        "backends": results,
    }


def _add_ratios(results: dict[str, Any]) -> None:
    """Each median and p99 as a ratio to the seed's in-memory cache, same op, same run."""
    base = results.get("inmemory", {}).get("ops", {})
    for row in results.values():
        for op, s in row.get("ops", {}).items():
            ref = base.get(op, {})
            s["ratio"] = ratio(s["median"], ref.get("median", float("nan")))
            s["ratio_p99"] = ratio(s["p99"], ref.get("p99", float("nan")))
        other = row.get("other_process")
        if other and "get_hit" in other:
            # The child's own in-memory baseline: one process, one moment.
            other["ratio"] = ratio(other["get_hit"]["median"],
                                   other["inmemory_get_hit"]["median"])
            other["first_read_ratio"] = ratio(other["first_read"]["median"],
                                              other["inmemory_get_hit"]["median"])
