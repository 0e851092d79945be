"""What users cost: get with and without a user, and invalidate_by_user at 10,000 sessions.

    python -m bench.users [--sessions 10000] [--repeat 7]

Both gets run in the same process on the same segment, interleaved over distinct tokens,
so the ratio compares like with like (issue 6: with a user within 1.25x of without).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable

from shmcache import SharedMemorySessionCache


def _per_call(fn: Callable[[str], object], tokens: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in tokens:
            fn(t)
        best = min(best, time.perf_counter() - t0)
    return best / len(tokens) * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    name = f"shmcache-bench-users-{os.getpid()}"
    cache = SharedMemorySessionCache.create(name, capacity=65536)
    try:
        half = args.sessions // 2
        plain = [secrets.token_urlsafe(32) for _ in range(half)]
        owned = [secrets.token_urlsafe(32) for _ in range(half)]
        for t in plain:
            cache.set(t, {"id": 1}, 3600)
        for i, t in enumerate(owned):
            cache.set(t, {"id": 1}, 3600, user_id=i % (half // 5 or 1))  # ~5 per user
        without = [_per_call(cache.get, plain, 1) for _ in range(args.repeat)]
        with_user = [_per_call(cache.get, owned, 1) for _ in range(args.repeat)]
        g0, g1 = min(without), min(with_user)
        revokes = []
        for user in range(0, half // 5, max(1, half // 500)):
            t0 = time.perf_counter()
            cache.invalidate_by_user(user)
            revokes.append((time.perf_counter() - t0) * 1e6)
        print(f"{args.sessions} live sessions, capacity {cache.capacity}, best of {args.repeat}")
        print(f"get (hit), no user:   {g0:7.0f} ns")
        print(f"get (hit), with user: {g1:7.0f} ns  ({g1 / g0:.2f}x)")
        print(f"invalidate_by_user:   median {statistics.median(revokes):.0f} us, "
              f"max {max(revokes):.0f} us over {len(revokes)} users (~5 sessions each)")
    finally:
        cache.unlink()
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
