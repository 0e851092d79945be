"""Percentiles and batch timing, shared by every section."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

_np: Any
try:  # numpy comes with matplotlib (the bench extra); sorting in Python is the fallback
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the environment
    _np = None


def percentiles(samples: Sequence[float], points: Sequence[float]) -> list[float]:
    """Nearest-rank percentiles (``points`` in 0..100) of ``samples``; NaN when empty."""
    if not len(samples):
        return [math.nan for _ in points]
    if _np is not None and len(samples) > 10000:
        arr = _np.asarray(samples, dtype=_np.float64)
        return [float(v) for v in _np.percentile(arr, list(points), method="inverted_cdf")]
    ordered = sorted(samples)
    n = len(ordered)
    return [float(ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))]) for p in points]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """``median``, ``p99``, ``p999``, ``mean`` and ``n`` of a list of ns figures."""
    p50, p99, p999 = percentiles(samples, (50, 99, 99.9))
    mean = math.fsum(samples) / len(samples) if len(samples) else math.nan
    return {"median": p50, "p99": p99, "p999": p999, "mean": mean, "n": len(samples)}


def batches(
    run: Callable[[int], float],
    seconds: float,
    min_batches: int,
    max_batches: int,
) -> list[float]:
    """Call ``run(i)`` (which times one batch and returns ns per call) until ``seconds``
    have passed and at least ``min_batches`` samples exist, at most ``max_batches``."""
    gc.collect()  # start every measurement with the same (empty) garbage backlog
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while i < max_batches and (i < min_batches or time.perf_counter() < deadline):
        out.append(run(i))
        i += 1
    return out


def loop_overhead_ns(tokens: Sequence[str], batch: int, rounds: int = 200) -> float:
    """Median ns per iteration of the bare timed ``for`` loop: subtracted from every
    single-process figure, so a ratio compares the calls, not the harness."""
    pc = time.perf_counter_ns
    n = len(tokens)
    samples = []
    for r in range(rounds):
        start = (r * batch) % max(1, n - batch)
        chunk = tokens[start : start + batch]
        t0 = pc()
        for _t in chunk:
            pass
        samples.append((pc() - t0) / len(chunk))
    return percentiles(samples, (50,))[0]


def ratio(a: Any, b: Any) -> float:
    """``a / b``, NaN when either is missing (None, NaN) or ``b`` is not positive."""
    if not (finite(a) and finite(b)) or b <= 0:
        return math.nan
    return float(a / b)


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
