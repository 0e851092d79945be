"""The issue's targets, judged against the figures of one run.

Each target lists its figure per variant (mode, workload) and is met only if every
variant is; a target whose figures were not measured (a section or a peer skipped) is
``None``, never silently met.
"""

from __future__ import annotations

from typing import Any

from .stats import finite, ratio

SHM = {"shm": "hash-only", "shm-value": "value mode"}

# Why a target can be missed, one line each, shown beside every MISSED row (issue 12: the
# README listed five targets as MISSED with no word beside them). Causes, not excuses: each
# names what would have to change to meet the target.
WHY_MISSED = {
    "set vs InMemorySessionCache.set":
        "a set pickles the session (its value, or in hash-only mode its fingerprint, so that"
        " an equal set elsewhere keeps other processes' copies): pickle.dumps alone is about"
        " 8,000 instructions, 3.7x the seed's whole set, which stores the object; the"
        " compiled core's locked write adds the lock, the lease check and the keyed hashes."
        " Sets run once per login or cache miss, gets on every request",
    "compiled core: get (hit) vs the seed's get":
        "the hit is a dict lookup, one 8-byte load of the slot's check word in shared memory"
        " and a clock read, 0.44x the seed's instructions; the load misses the CPU cache when"
        " the token pool and the table are large, as here (a 1 MiB check-word array), and"
        " runs of this shared VM differ by more than the margin",
    "compiled core: get (miss) vs the seed's get":
        "a miss (about 3,050 instructions with xxh3 inline, 3,550 through the xxhash module)"
        " scans the 96-slot window in shared memory (about 300, and cache misses a dict's one"
        " probe does not have) and records a lease for the set that may follow (about 1,200:"
        " a tuple in a per-thread dict, which is what lets a racing logout void that set);"
        " the seed's miss is one dict lookup (1,076). Leases kept in C structures would"
        " remove most of the rest",
    "compiled core: set vs the seed's set":
        "pickle.dumps of the session (its value, or its fingerprint in hash-only mode) is"
        " about 8,000 of the set's 11,700 instructions (xxh3 inline), 3.7x the seed's whole"
        " set; the lock, the lease check, the keyed hashes and the per-process copy make the"
        " rest: only a set that stores no encoding could meet it",
    "compiled core: invalidate vs the seed's invalidate":
        "a logout (about 2,050 instructions with xxh3 inline, 2.1x the seed's) takes the"
        " robust mutex, journals and zeroes the slot (and frees its value's block), scans the"
        " rest of the window for another copy and marks the lease bucket; the seed pops one"
        " dict key. In instructions it is within the goal; in time the mutex's atomic"
        " operations and the shared-memory stores (cache lines other processes read) cost"
        " more than their count",
    "compiled core: first read of a ~200-byte session set by another process, vs the "
    "seed's get":
        "decoding is the codec's: pickle.loads of a 200-byte session is about 9,700 of the"
        " read's 12,100 instructions, 7x the seed's whole get; the table's own work (hash,"
        " probe, the checked copy of the slot and its value, remembering the object) is"
        " about 2,400: only a cheaper codec gets there",
    "throughput, 2 processes vs 1 (2 cores)":
        "two processes have two cores only when nothing else runs on this shared VM: the"
        " empty loop and the in-memory cache beside the figures are that run's ceiling; and"
        " where tokens are shared in value mode, each set by one process makes the other's"
        " copy stale, so its next get decodes the value, while writers take turns on one lock",
    "p99.9 get latency with 8 processes vs in-memory's":
        "8 processes on 2 cores: a get preempted mid-call waits a whole time slice, and a"
        " call several times longer than a dict lookup is that much likelier to be the one"
        " preempted; in value mode a get its own map cannot answer (a session set by"
        " another process, or a miss) also copies and decodes the slot, several us",
    "gunicorn (4 workers) requests/s vs the in-memory cache":
        "the 4 workers and wrk share 2 cores, so every microsecond a request spends in the"
        " cache is one less for serving, and rounds on this shared VM differ by several"
        " percent (each is in the end-to-end table)",
    "shared memory per session, hash-and-expiry mode":
        "the table runs half full so that churn at capacity evicts nothing (at 2/3 it did),"
        " a slot is 48 B (16 tag, 8 check word, 8 expiry, 8 user hash for invalidate_by_user,"
        " 8 fingerprint for equal sets) and leases add 8 B: 48 B would cost evictions, the"
        " per-user logout or the workers' shared sessions",
    "4 processes sharing 10,000 tokens (98% get, 1% set on miss, 1% invalidate): value "
    "mode's CPU per request vs the seed's dict":
        "the 1% of logouts each take the lock and write shared words that every other"
        " process's next read of that slot must fetch from the other core, and each makes"
        " every process's next get of the token a miss and a set (a locked write with an"
        " encoding) or a decode, where the seed's dict forgets the token in one process only",
    "compiled core: the same mix's CPU per request vs the seed's dict":
        "the gets cost what the seed's do (a dict lookup and one shared 8-byte load); the"
        " difference is the 1% of logouts and the sets and decodes they cause in every"
        " process (a locked write with a pickle, about 11,700 instructions, or a decode,"
        " about 12,100, against the seed's 2,100), while the seed's logout reaches one"
        " worker; rounds of this shared VM differ by 20-30% (each is in the mix table)",
    "full run time":
        "the real app's section (issue 11) runs 5 caches x 2 dependencies x 2 connection modes"
        " under gunicorn, each round as long as the app's 10 s TTL plus a warm-up: about 5"
        " minutes of the run, and issue 15's callgrind section (valgrind runs five"
        " interpreters) about one more; --quick leaves both out",
}


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _target(
    name: str, cmp: str, limit: float, figures: dict[str, Any], unit: str = "x"
) -> dict[str, Any]:
    figs = {k: v for k, v in figures.items() if finite(v)}
    met: bool | None = None
    if figs:
        met = all(v <= limit if cmp == "<=" else v >= limit for v in figs.values())
    return {"name": name, "cmp": cmp, "limit": limit, "unit": unit, "figures": figs,
            "met": met}


# Issue 15's goals for the compiled core: the default shared-memory rows when they ran it.
# The instruction counts (callgrind, repeatable) and the pure-Python rows are context.
_FAST_GOALS = (
    ("get_hit", "get (hit)", 1.1), ("get_miss", "get (miss)", 1.5), ("set", "set", 2.5),
    ("invalidate", "invalidate", 2.5),
)
_INSTR = {"shm": "c", "shm-value": "c-value"}
_PURE = {"shm": "shm-py", "shm-value": "shm-value-py"}


def _fast_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    single = _get(result, "single", "backends") or {}
    instr = _get(result, "instructions", "variants") or {}
    compiled = {k: m for k, m in SHM.items()
                if str(_get(single, k, "impl") or "").endswith(", c")}
    out = []
    for op, name, limit in _FAST_GOALS:
        t = _target(f"compiled core: {name} vs the seed's {name.split(' ')[0]}", "<=", limit,
                    {m: _get(single, k, "ops", op, "ratio") for k, m in compiled.items()})
        t["context"] = {f"{m}, instructions": _get(instr, _INSTR[k], "ratio", op)
                        for k, m in compiled.items()}
        if op == "invalidate":
            t["context"].update({f"{m}, absent token": _get(single, k, "ops",
                                                             "invalidate_absent", "ratio")
                                 for k, m in compiled.items()})
        t["context"].update({f"pure Python {m}": _get(single, _PURE[k], "ops", op, "ratio")
                             for k, m in compiled.items()})
        out.append(t)
    value = "shm-value" if "shm-value" in compiled else None
    t = _target("compiled core: first read of a ~200-byte session set by another process, vs "
                "the seed's get", "<=", 5.0,
                {"value mode": _get(single, value, "other_process", "first_read_ratio")}
                if value else {})
    t["context"] = {"instructions": _get(instr, "c-value", "ratio", "first_read"),
                    "pure Python": _get(single, "shm-value-py", "other_process",
                                        "first_read_ratio")}
    out.append(t)
    return out


_SPREAD = {"sync": "sync", "async": "async"}


def _app_targets(caches: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 11's goals in the real app. Judged with a new connection per request, which
    spreads every user's requests over the workers (the issue's setting); keep-alive
    figures are context only: there the kernel decides, server by server, how many
    workers get any connection at all, so two caches' rows compare different spreads."""

    def ratios(key: str, mode: str, prefix: str = "") -> dict[str, Any]:
        return {prefix + dep: _get(caches, key, "variants", dep, mode, "validations_ratio")
                for dep in _SPREAD}

    hash_only = _target("real app, new connection per request: database validations per "
                        "1000 requests, hash-only vs the seed's (4 workers)", "<=", 1.5,
                        ratios("shm", "close"))
    hash_only["context"] = ratios("shm", "keepalive", "keep-alive, ")
    value = _target("real app, new connection per request: database validations per 1000 "
                    "requests, value mode (value_size=4096, the README's recipe, and 512) vs "
                    "the seed's", "<=", 0.5,
                    {**ratios("shm-4096", "close", "4096, "), **ratios("shm-512", "close",
                                                                      "512, ")})
    value["context"] = {**ratios("shm-4096", "keepalive", "keep-alive, 4096, "),
                        **ratios("shm-256", "close", "value_size=256, ")}
    stale: dict[str, Any] = {}
    for key, row in caches.items():
        counts = [v["stale"]["accepted_after_logout"]
                  for modes in row.get("variants", {}).values() for v in modes.values()]
        if counts:
            stale[row["label"] if key != "inmemory" else "seed"] = sum(counts)
    seed = {"seed (its bug)": stale.pop("seed")} if "seed" in stale else {}
    logout = _target("real app: requests accepted after their logout returned, every "
                     "shared cache, all variants", "<=", 0, stale, unit=" requests")
    logout["context"], logout["digits"] = seed, 0
    return [hash_only, value, logout]


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    single = _get(result, "single", "backends") or {}
    multi = _get(result, "multi", "workloads") or {}
    e2e = _get(result, "e2e", "backends") or {}
    out = []

    def op_ratio(op: str) -> dict[str, Any]:
        return {m: _get(single, k, "ops", op, "ratio") for k, m in SHM.items()}

    out.append(_target("get (hit) vs InMemorySessionCache.get, same process", "<=", 2.0,
                       op_ratio("get_hit")))
    out.append(_target("get (hit) in a process other than the setter, vs in-memory",
                       "<=", 2.0, {"value mode": _get(single, "shm-value", "other_process",
                                                      "ratio")}))
    out.append(_target("set vs InMemorySessionCache.set", "<=", 6.0, op_ratio("set")))
    for peer, label, limit in (("lmdb", "LMDB", 1.0), ("diskcache", "diskcache", 10.0),
                               ("redis", "Redis (loopback)", 50.0)):
        peer_get = _get(single, peer, "ops", "get_hit", "median")
        figs = {m: ratio(peer_get, _get(single, k, "ops", "get_hit", "median"))
                if peer_get is not None else None for k, m in SHM.items()}
        cmp_word = "faster than" if limit == 1.0 else f"at least {limit:g}x below"
        out.append(_target(f"get {cmp_word} {label} (peer's get / shmcache's get)",
                           ">" if limit == 1.0 else ">=", limit, figs))
    scaling, tail = {}, {}
    for workload, rows in multi.items():
        for k, m in SHM.items():
            scaling[f"{m}, {workload}"] = _get(rows, k, "counts", "2", "scaling")
            tail[f"{m}, {workload}"] = _get(rows, k, "counts", "8", "latency", "get",
                                            "ratio_p999")
    ceiling = _get(result, "multi", "machine", "2", "scaling")
    t = _target("throughput, 2 processes vs 1 (2 cores)", ">=", 1.7, scaling)
    t["context"] = {"machine ceiling (empty loop)": ceiling}
    for workload, rows in multi.items():
        t["context"][f"in-memory, {workload}"] = _get(rows, "inmemory", "counts", "2", "scaling")
    out.append(t)
    out.append(_target("p99.9 get latency with 8 processes vs in-memory's", "<=", 3.0, tail))
    out.append(_target("gunicorn (4 workers) requests/s vs the in-memory cache", ">=", 0.95,
                       {m: _get(e2e, k, "rps_ratio") for k, m in SHM.items()}))
    per_mode = _get(result, "memory", "per_mode") or []
    hash_only = [m["bytes_per_session"] for m in per_mode if m["value_size"] == 0]
    out.append(_target("shared memory per session, hash-and-expiry mode", "<=", 48.0,
                       {"hash-only": hash_only[0] if hash_only else None}, unit=" B"))
    mixv = _get(result, "mix", "variants") or {}
    # Judged on the implementation a default install runs (the compiled core when it was
    # built); the pure-Python fallback's figure is context.
    default = "shm-value" if "shm-value" in mixv else "shm-value-py"
    t = _target("4 processes sharing 10,000 tokens (98% get, 1% set on miss, 1% invalidate): "
                "value mode's CPU per request vs the seed's dict", "<=", 2.0,
                {"value mode": _get(mixv, default, "ratio")} if mixv else {})
    if default == "shm-value":
        t["context"] = {"pure Python": _get(mixv, "shm-value-py", "ratio")}
    out.append(t)
    t = _target("compiled core: the same mix's CPU per request vs the seed's dict", "<=", 1.5,
                {m: _get(mixv, k, "ratio") for k, m in
                 (("shm", "hash-only"), ("shm-value", "value mode"))})
    t["context"] = {f"pure Python {m}": _get(mixv, k, "ratio") for k, m in
                    (("shm-py", "hash-only"), ("shm-value-py", "value mode"))}
    out.append(t)
    values = _get(result, "memory", "values") or []
    out.append(_target(
        "value mode: shared memory a stored session adds over its encoded size (the seed "
        "app's Session, value_size=4096)", "<=", 64.0,
        {v["codec"]: v["over_encoding"] for v in values}, unit=" B"))
    out += _fast_targets(result)
    out += _app_targets(_get(result, "app", "caches") or {})
    mode = _get(result, "meta", "mode")
    budget = {"quick": 60.0, "full": 600.0}.get(str(mode))
    if budget is not None:
        out.append(_target(f"--{mode} run time" if mode == "quick" else "full run time",
                           "<=", budget, {str(mode): _get(result, "meta", "seconds")},
                           unit=" s"))
    for t in out:  # ">" means strictly faster
        if t["cmp"] == ">" and t["figures"]:
            t["met"] = all(v > t["limit"] for v in t["figures"].values())
        t["why"] = (
            WHY_MISSED.get(t["name"], "not explained yet: add it to bench.targets.WHY_MISSED")
            if t["met"] is False else ""
        )
    return out
