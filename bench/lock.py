"""The cost of the segment lock, side by side in one run (issue 10).

``python -m bench.lock`` times, interleaved over rounds (min of each): a POSIX semaphore
acquire+release (the mechanism the robust mutex replaced), the mutex's trylock + one-call
release as every write takes it, and the cache's ``set`` and ``invalidate`` against the
seed's dict-backed cache on the same tokens. Printed as ns per call and as ratios.
"""

from __future__ import annotations

import argparse
import os
import timeit

import posix_ipc

from shmcache import SharedMemorySessionCache
from shmcache.shm.layout import W_WRITING

from .seed import InMemorySessionCache as SeedInMemorySessionCache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lock", description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--number", type=int, default=20000)
    args = p.parse_args(argv)
    name = f"shmcache-bench-lock-{os.getpid()}"
    cache = SharedMemorySessionCache.create(name, capacity=65536)
    sem = posix_ipc.Semaphore(f"/{name}-sem", posix_ipc.O_CREX, initial_value=1)
    seed = SeedInMemorySessionCache()
    try:
        lock = cache._lock
        tokens = [f"tok-{i:06d}-" + "x" * 32 for i in range(args.number)]
        session = {"id": 1}

        def sem_cycle() -> None:
            sem.acquire(0)
            sem.release()

        words = cache._words

        def mutex_cycle() -> None:
            try:
                lock.acquire()
                words[W_WRITING] = 0  # as every write ends
            finally:
                lock.release()

        def writes(c: object) -> None:
            for t in tokens:
                c.set(t, session, 60.0)  # type: ignore[attr-defined]
            for t in tokens:
                c.invalidate(t)  # type: ignore[attr-defined]

        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for label, fn, n in (
                ("semaphore acquire+release", sem_cycle, args.number),
                ("mutex acquire+release (the lock of every write)", mutex_cycle, args.number),
                ("seed dict: set+invalidate", lambda: writes(seed), 1),
                ("shm: set+invalidate", lambda: writes(cache), 1),
            ):
                ns = timeit.timeit(fn, number=n) / (n if n > 1 else 2 * args.number) * 1e9
                best[label] = min(best.get(label, ns), ns)
        for label, ns in best.items():
            print(f"{label:52} {ns:8.0f} ns")
        added = best["mutex acquire+release (the lock of every write)"] - best[
            "semaphore acquire+release"]
        print(f"{'lock cost added per write vs the semaphore':52} {added:8.0f} ns")
        ratio = best["shm: set+invalidate"] / best["seed dict: set+invalidate"]
        print(f"{'shm write / seed dict write':52} {ratio:8.1f} x")
    finally:
        sem.unlink()
        sem.close()
        cache.close()
        cache.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
