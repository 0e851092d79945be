"""How often does a table filled to ``capacity`` evict? The figure behind the README claim.

    python -m bench.sizing [--capacities 65536 1000000] [--trials 20] [--churn 1.0]

Each trial fills a fresh table (real table code, random tokens, a fresh secret) to exactly
``capacity`` live sessions, optionally replaces ``churn * capacity`` of them one by one
(remove a random live one, insert a new one), and counts evictions. It also records the
fullest probe window seen, i.e. the margin left before an eviction.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import time

from shmcache.shm.layout import W_EVICTIONS, Geometry
from shmcache.shm.table import Table, make_meta

FAR = 10**9


def trial(capacity: int, churn: float, rnd: random.Random) -> dict[str, int]:
    geo = Geometry.for_capacity(capacity)
    table = Table(bytearray(geo.size), geo, secrets.randbits(64), secrets.randbits(64))
    live: list[tuple[bytes, int]] = []
    for i in range(capacity):
        tag, home = table.tag_of(rnd.randbytes(32))
        table.store_locked(tag, home, make_meta(FAR, i), None, 0)
        live.append((tag, home))
    for i in range(int(churn * capacity)):
        j = rnd.randrange(len(live))
        table.remove_locked(*live[j])
        tag, home = table.tag_of(rnd.randbytes(32))
        table.store_locked(tag, home, make_meta(FAR, i), None, 0)
        live[j] = (tag, home)
    # The largest displacement of any live entry: how close a window came to full.
    worst = max(table.find(tag, home) - home for tag, home in live)
    return {"evictions": int(table.words[W_EVICTIONS]), "max_displacement": worst}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[65536, 1_000_000])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--churn", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    results = []
    for capacity in args.capacities:
        t0 = time.perf_counter()
        runs = [trial(capacity, args.churn, rnd) for _ in range(args.trials)]
        row = {
            "capacity": capacity,
            "window": Geometry.for_capacity(capacity).window,
            "trials": args.trials,
            "churn": args.churn,
            "inserts": args.trials * int(capacity * (1 + args.churn)),
            "evictions": sum(r["evictions"] for r in runs),
            "max_displacement": max(r["max_displacement"] for r in runs),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
