"""Many processes on one store: aggregate throughput and tail latency, 1 to 8 processes.

Every worker is forked (as gunicorn forks its workers) and opens the store itself, reads
and sets every token of its pool once (an app's warm-up: get, and set on a miss), then
runs 90% get / 9% set / 1% invalidate on random tokens of that pool until the deadline,
timing every call with ``perf_counter_ns``. Two pools:

* ``shared``: every worker draws from one pool (a load balancer that spreads each user's
  requests over every worker). A set by one worker is news to the others: in value mode
  their next get decodes it; in hash-only mode it is a miss (the documented cost).
* ``sticky``: each worker has a pool of its own (sticky sessions), so what remains is the
  cost of sharing one segment and one lock.

The seed's in-memory cache runs the same way (one dict per process) for comparison: what
the scheduler does to 8 processes on 2 cores it does to both. So does a pure-Python loop
that shares nothing (``machine``): its scaling is the most any workload can scale on this
machine at this moment (a shared VM's second core may be partly someone else's).
"""

from __future__ import annotations

import multiprocessing
import random
import time
from array import array
from typing import Any

from .backends import Backend, Resources, Store
from .config import Config
from .progress import Progress
from .stats import ratio, summary
from .workload import TTL, session, tokens

KINDS = ("get", "set", "invalidate")
WEIGHTS = (90, 9, 1)
_OPS_CYCLE = 65536  # pre-drawn operations, cycled: no random draws inside the timed loop


def _worker(
    store: Store, pool: list[str], seed: int, seconds: float, ready: Any, go: Any, conn: Any
) -> None:
    announced = False
    try:
        cache = store.open()
        get, set_, inval = cache.get, cache.set, cache.invalidate
        sessions = {t: session(t, i) for i, t in enumerate(pool)}
        for t in pool:
            if get(t) is None:
                set_(t, sessions[t], TTL)
        rng = random.Random(seed)
        kinds = rng.choices((0, 1, 2), weights=WEIGHTS, k=_OPS_CYCLE)
        ops = [(k, pool[rng.randrange(len(pool))]) for k in kinds]
        # The deadline is looked at between slices: often enough that a slow backend
        # cannot overrun it by much, rarely enough to cost nothing per call.
        slices = [ops[i : i + 512] for i in range(0, len(ops), 512)]
        lat = (array("q"), array("q"), array("q"))
        lat_get, lat_set, lat_inv = lat
        pc = time.perf_counter_ns
        hits = 0
        ready.put(seed)
        announced = True
        if not go.wait(timeout=300):
            raise TimeoutError("the parent never said go")
        start = pc()
        deadline = start + int(seconds * 1e9)
        done = False
        while not done:
            for chunk in slices:
                for kind, t in chunk:
                    if kind == 0:
                        t0 = pc()
                        found = get(t)
                        lat_get.append(pc() - t0)
                        if found is not None:
                            hits += 1
                    elif kind == 1:
                        s = sessions[t]
                        t0 = pc()
                        set_(t, s, TTL)
                        lat_set.append(pc() - t0)
                    else:
                        t0 = pc()
                        inval(t)
                        lat_inv.append(pc() - t0)
                if pc() >= deadline:
                    done = True
                    break
        elapsed = (pc() - start) / 1e9
        conn.send({
            "elapsed": elapsed, "hits": hits, "latency": [a.tobytes() for a in lat],
        })
    except BaseException as exc:  # report instead of leaving the parent waiting
        if not announced:
            ready.put(-1)
        conn.send({"error": repr(exc)})
    finally:
        conn.close()


def _spin(seconds: float, ready: Any, go: Any, conn: Any) -> None:
    """Shares nothing: ops/s of an empty Python loop, in batches of 1,000 iterations."""
    ready.put(0)
    go.wait(timeout=300)
    pc = time.perf_counter
    start = pc()
    deadline = start + seconds
    n = 0
    while pc() < deadline:
        for _ in range(1000):
            pass
        n += 1000
    conn.send(n / (pc() - start))
    conn.close()


def machine(nproc: int, seconds: float) -> float:
    """Aggregate loop iterations per second of ``nproc`` processes that share nothing."""
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Queue(), ctx.Event()
    pipes, procs = [], []
    for _ in range(nproc):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_spin, args=(seconds, ready, go, child))
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    for _ in range(nproc):
        ready.get(timeout=60)
    go.set()
    total = float(sum(parent.recv() for parent in pipes))
    for p in procs:
        p.join()
    return total


def _run_count(
    store: Store, nproc: int, cfg: Config, workload: str, pool: list[str]
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Queue(), ctx.Event()
    pipes, procs = [], []
    per = max(1, len(pool) // nproc)
    for i in range(nproc):
        mine = pool if workload == "shared" else pool[i * per : (i + 1) * per]
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_worker, args=(store, mine, 1000 + i, cfg.multi_seconds, ready, go, child)
        )
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    for _ in range(nproc):
        ready.get(timeout=120)
    go.set()
    outs = []
    for parent in pipes:
        try:
            outs.append(parent.recv())
        except EOFError:
            outs.append({"error": "worker died"})
    for p in procs:
        p.join(timeout=30)
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        return {"error": errors[0]}
    merged = [array("q") for _ in KINDS]
    per_proc = []
    gets = 0
    for o in outs:
        counts = []
        for k, raw in enumerate(o["latency"]):
            a = array("q")
            a.frombytes(raw)
            merged[k].extend(a)
            counts.append(len(a))
        gets += counts[0]
        per_proc.append(sum(counts) / o["elapsed"])
    ops_total = sum(len(a) for a in merged)
    return {
        "processes": nproc,
        "throughput": sum(per_proc),  # each worker's ops/s over its own (equal) window
        "per_process": per_proc,
        "ops": ops_total,
        "hit_rate": ratio(sum(o["hits"] for o in outs), gets),
        "latency": {kind: summary(merged[k]) for k, kind in enumerate(KINDS)},
    }


def run(cfg: Config, backends: list[Backend], res: Resources, progress: Progress) -> dict[str, Any]:
    pool = tokens(cfg.multi_pool)
    results: dict[str, Any] = {}
    progress.step("machine ceiling: an empty loop in 1..8 processes")
    before = {n: machine(n, min(cfg.multi_seconds, 1.0)) for n in cfg.procs}
    for workload in ("sticky", "shared"):
        rows: dict[str, Any] = {}
        for b in backends:
            if b.key not in cfg.multi_backends:
                continue
            store = b.make(res)
            try:
                row: dict[str, Any] = {"label": b.label, "counts": {}}
                for n in cfg.procs:
                    progress.step(f"{workload}: {b.label}, {n} process(es)")
                    row["counts"][str(n)] = _run_count(store, n, cfg, workload, pool)
            finally:
                store.destroy()
            counts = row["counts"]
            one = counts.get("1", {}).get("throughput", float("nan"))
            for c in counts.values():
                c["scaling"] = ratio(c.get("throughput", float("nan")), one)
            rows[b.key] = row
        results[workload] = rows
    progress.step("machine ceiling again (the VM drifts)")
    after = {n: machine(n, min(cfg.multi_seconds, 1.0)) for n in cfg.procs}
    machine_row = {
        str(n): {
            "loops_per_s": [before[n], after[n]],
            "scaling": ratio(before[n] + after[n], before[cfg.procs[0]] + after[cfg.procs[0]]),
        }
        for n in cfg.procs
    }
    _add_tail_ratios(results)
    return {
        "method": "forked workers, 90/9/1 get/set/invalidate on random tokens, every call "
                  "timed with perf_counter_ns (the timer's cost is in every figure)",
        "mix": dict(zip(KINDS, WEIGHTS, strict=True)),
        "seconds": cfg.multi_seconds,
        "pool": cfg.multi_pool,
        "machine": machine_row,
        "workloads": results,
    }


def _add_tail_ratios(results: dict[str, Any]) -> None:
    """Per process count, each percentile as a ratio to the in-memory cache's."""
    for rows in results.values():
        base = rows.get("inmemory", {}).get("counts", {})
        for row in rows.values():
            for n, c in row["counts"].items():
                ref = base.get(n, {}).get("latency", {})
                for kind, s in c.get("latency", {}).items():
                    r = ref.get(kind, {})
                    for p in ("median", "p99", "p999"):
                        s[f"ratio_{p}"] = ratio(s[p], r.get(p, float("nan")))
