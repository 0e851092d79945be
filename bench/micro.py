"""Single-process cost of each SessionCache call, every backend in one run, as ratios.

    python bench/micro.py [--n 20000] [--repeat 7]

Times with perf_counter over batches of distinct tokens (so the table's memory is touched
the way a server touches it, not one hot cache line) and reports the best batch, in ns
per call, beside the seed's InMemorySessionCache (the baseline: ratio 1.00).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import posix_ipc
import xxhash

from shmcache import InMemorySessionCache, SharedMemorySessionCache


def _best(fn: Callable[[], None], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n * 1e9


def measure(cache: Any, tokens: list[str], other: list[str], repeat: int) -> dict[str, float]:
    session = {"id": 1, "token": "x", "created_at": "2026-11-27T00:00:00", "expires_at": "z"}
    n = len(tokens)
    for t in tokens:
        cache.set(t, session, 3600)
    get, set_, inval = cache.get, cache.set, cache.invalidate
    out = {
        "get (hit)": _best(lambda: [get(t) for t in tokens] and None, n, repeat),
        "get (miss)": _best(lambda: [get(t) for t in other] and None, n, repeat),
        "set": _best(lambda: [set_(t, session, 3600) for t in tokens] and None, n, repeat),
    }

    def churn() -> None:
        for t in tokens:
            inval(t)
        for t in tokens:
            set_(t, session, 3600)

    out["invalidate + set"] = _best(churn, n, repeat)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    tokens = [secrets.token_urlsafe(32) for _ in range(args.n)]
    other = [secrets.token_urlsafe(32) for _ in range(args.n)]
    name = f"shmcache-bench-{os.getpid()}"
    results: dict[str, dict[str, float]] = {}
    results["InMemorySessionCache (seed)"] = measure(
        InMemorySessionCache(), tokens, other, args.repeat
    )
    for label, value_size in (("shm, hash-only", 0), ("shm, value_size=256", 256)):
        cache = SharedMemorySessionCache.create(name, capacity=65536, value_size=value_size)
        try:
            results[label] = measure(cache, tokens, other, args.repeat)
            if value_size:
                # A second cache object that did not set anything: its first get decodes
                # from shared memory, later ones take the fast path (another worker's view).
                reader = SharedMemorySessionCache.attach(name)
                for t in tokens:
                    reader.get(t)
                results[label]["get (hit, set elsewhere)"] = _best(
                    lambda r=reader: [r.get(t) for t in tokens] and None, args.n, args.repeat
                )
                reader.close()
        finally:
            cache.unlink()
            cache.close()
    base = results["InMemorySessionCache (seed)"]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, posix_ipc "
        f"{posix_ipc.VERSION}, xxhash {xxhash.VERSION}, {args.n} tokens, best of {args.repeat}"
    )
    ops = [*base, "get (hit, set elsewhere)"]
    print(f"{'backend':<30}" + "".join(f"{op:>26}" for op in ops))
    for label, row in results.items():
        cells = []
        for op in ops:
            if op not in row:
                cells.append(f"{'-':>26}")
                continue
            ref = base.get(op, base["get (hit)"])
            cells.append(f"{row[op]:>10.0f} ns ({row[op] / ref:5.2f}x)".rjust(26))
        print(f"{label:<30}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
