"""Instructions per call under callgrind: the shared-memory backend's two implementations
(the compiled core and pure Python) against the seed's dict, on the same calls (issue 15).

Time on a shared 2-core VM drifts from run to run; instruction counts repeat within 1%.
Each backend runs once under ``valgrind --tool=callgrind`` in a fresh interpreter (the
driver below): it sets up, then runs each operation ``n`` times on distinct tokens, with a
marker call (``os.getppid()``, a libc call nothing else makes) between phases, and
callgrind dumps its counters at each marker (``--dump-before=getppid``). A phase's count
minus the bare loop's, over ``n``, is the operation's cost. ``first_read`` is a get of a
session another cache object set (a ~200-byte pickled session: what a process that did
not set it decodes); for the seed it is its get, which is all it has.

``python -m bench.instructions`` prints the table; ``python -m bench`` runs it as its
``instructions`` section (skipped, saying so, without valgrind).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .stats import ratio

ROOT = Path(__file__).resolve().parent.parent
OPS = ("get_hit", "get_miss", "set", "invalidate", "invalidate_absent", "first_read")
PHASES = ("loop", "get_hit", "get_miss", "set", "invalidate", "invalidate_absent",
          "first_read", "loop2")
# key -> (label, value_size or None for the seed, pure Python?)
VARIANTS: dict[str, tuple[str, int | None, bool]] = {
    "seed": ("InMemorySessionCache (seed)", None, False),
    "c": ("shmcache, hash-only, compiled", 0, False),
    "c-value": ("shmcache, value_size=256, compiled", 256, False),
    "py": ("shmcache, hash-only, pure Python", 0, True),
    "py-value": ("shmcache, value_size=256, pure Python", 256, True),
}
TTL = 3600.0


def _drive(key: str, n: int) -> None:
    """The program callgrind runs (see the module docstring)."""
    import random
    from unittest import mock

    from shmcache import SharedMemorySessionCache
    from shmcache.shm import fast

    from .seed import InMemorySessionCache
    from .workload import session, tokens

    _, value_size, pure = VARIANTS[key]
    rng = random.Random(15)
    hit, absent, fresh, other, absent2, warm = (tokens(n, rng) for _ in range(6))
    sessions = [session(t, i) for i, t in enumerate(fresh)]
    name = f"shmcache-bench-instr-{os.getpid()}"
    cache: Any
    writer: Any = None
    if value_size is None:
        cache = InMemorySessionCache()
        writer = cache
    else:
        with mock.patch.dict(os.environ, {fast.ENV: "1" if pure else "0"}):
            cache = SharedMemorySessionCache.create(name, capacity=65536, value_size=value_size)
            writer = SharedMemorySessionCache.attach(name)
    try:
        for i, t in enumerate(hit):
            cache.set(t, session(t, i), TTL)
        for i, t in enumerate(other):
            writer.set(t, session(t, i), TTL)
        # Warm every path once (counter records, lease maps, codec state), off the record.
        for i, t in enumerate(warm[:50]):
            cache.get(t)
            cache.set(t, session(t, i), TTL)
            cache.get(t)
            cache.invalidate(t)
            cache.invalidate(t)
        get, set_, invalidate = cache.get, cache.set, cache.invalidate
        marker = os.getppid
        marker()
        for _t in hit:
            pass
        marker()
        for t in hit:
            get(t)
        marker()
        for t in absent:
            get(t)
        marker()
        for t, s in zip(fresh, sessions, strict=True):
            set_(t, s, TTL)
        marker()
        for t in fresh:
            invalidate(t)
        marker()
        for t in absent2:
            invalidate(t)
        marker()
        for t in other:
            get(t)
        marker()
        for _t, _s in zip(fresh, sessions, strict=True):
            pass
        marker()
    finally:
        if value_size is not None:
            writer.close()
            cache.close()
            cache.unlink()


def valgrind_missing() -> str | None:
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (apt-get install valgrind)"
    return None


_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)


def _run_one(key: str, n: int, tmpdir: str) -> dict[str, Any]:
    out = os.path.join(tmpdir, f"cg-{key}")
    cmd = [
        "valgrind", "--tool=callgrind", "--dump-before=getppid", "--dump-instr=no",
        "--collect-jumps=no", f"--callgrind-out-file={out}.%p",
        sys.executable, "-c", f"from bench.instructions import _drive; _drive({key!r}, {n})",
    ]
    env = {k: v for k, v in os.environ.items() if k != "SHMCACHE_PURE_PYTHON"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    parts: dict[int, int] = {}
    for f in Path(tmpdir).glob(f"cg-{key}.*"):
        m = re.search(r"\.(\d+)\.(\d+)$", f.name)
        found = _TOTALS.search(f.read_text())
        if m and found:
            parts[int(m.group(2))] = int(found.group(1))
    # Part 1 is the setup; parts 2.. are the phases in order (the last dump is the exit).
    counts = [parts.get(i) for i in range(2, 2 + len(PHASES))]
    if any(c is None for c in counts):
        return {"error": f"callgrind wrote {sorted(parts)} parts, expected the phases"}
    by_phase = dict(zip(PHASES, counts, strict=True))
    per_call: dict[str, float] = {}
    for op in OPS:
        loop = by_phase["loop2"] if op == "set" else by_phase["loop"]
        per_call[op] = (by_phase[op] - loop) / n  # type: ignore[operator]
    return {"per_call": per_call, "loop_per_iteration": by_phase["loop"] / n}  # type: ignore[operator]


def run(n: int = 2000, keys: tuple[str, ...] = tuple(VARIANTS),
        note: Any = print) -> dict[str, Any]:
    """Instructions per call of every variant (two valgrind runs at a time)."""
    missing = valgrind_missing()
    if missing:
        note(f"skipped instruction counts: {missing}")
        return {"skipped": missing}
    tmpdir = tempfile.mkdtemp(prefix="shmcache-callgrind-")
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(zip(keys, pool.map(lambda k: _run_one(k, n, tmpdir), keys),
                               strict=True))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    seed = results.get("seed", {}).get("per_call", {})
    rows: dict[str, Any] = {}
    for key, res in results.items():
        label, value_size, pure = VARIANTS[key]
        row: dict[str, Any] = {"label": label, "value_size": value_size,
                               "implementation": None if value_size is None else
                               ("python" if pure else "c"), **res}
        if "per_call" in res:
            # First read: against the seed's get, the only read it has.
            row["ratio"] = {op: ratio(v, seed.get("get_hit" if op == "first_read" else op))
                            for op, v in res["per_call"].items()}
            if value_size == 0:  # hash-only: another object's session is a miss by design
                row["per_call"].pop("first_read")
                row["ratio"].pop("first_read")
        rows[key] = row
    return {"method": "callgrind instructions per call, (phase - bare loop) / n, one fresh "
                      "interpreter per variant", "n": n, "variants": rows}


def table(result: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    names = {"get_hit": "get (hit)", "get_miss": "get (miss)", "set": "set",
             "invalidate": "invalidate", "invalidate_absent": "invalidate (absent)",
             "first_read": "first read (value set elsewhere)"}
    headers = ["variant", *names.values()]
    rows = []
    for row in result.get("variants", {}).values():
        if "per_call" not in row:
            rows.append([row["label"], f"error: {row.get('error', '')}",
                         *[""] * (len(names) - 1)])
            continue
        cells = [row["label"]]
        for op in names:
            v = row["per_call"].get(op)
            r = row["ratio"].get(op)
            cells.append("-" if v is None else f"{v:,.0f} ({r:.2f}x)")
        rows.append(cells)
    return (f"Instructions per call (callgrind, {result.get('n', 0):,} calls each; ratio to "
            "the seed's dict, same operation; first read: to the seed's get)", headers, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("-n", type=int, default=2000, help="calls per operation")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated of {','.join(VARIANTS)}")
    args = p.parse_args(argv)
    keys = tuple(k for k in args.variants.split(",") if k)
    result = run(args.n, keys)
    if "skipped" in result:
        return 1
    from .report import text

    print(text(table(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
