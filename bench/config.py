"""Run sizes: ``--smoke`` (the test suite's, seconds), ``--quick`` (< 1 min), full (< 10 min)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Config:
    name: str
    backends: tuple[str, ...] | None  # None: every backend that is installed
    # single process
    tokens: int  # distinct live tokens the get-hit batches cycle through
    batch: int  # calls per timed batch (one sample = one batch's mean)
    op_seconds: float  # time budget per (backend, operation)
    min_batches: int
    max_batches: int
    # many processes
    procs: tuple[int, ...]
    multi_seconds: float
    multi_pool: int  # tokens shared by every worker process
    multi_backends: tuple[str, ...]
    # table behaviour
    table_capacity: int
    load_levels: tuple[float, ...]  # fractions of capacity
    churn_ops: int  # sets + invalidates
    churn_checkpoints: int
    # end to end (0 seconds: skipped)
    e2e_seconds: float
    e2e_backends: tuple[str, ...]
    # memory
    big_capacity: int
    # the real app (issue 11; 0 seconds: skipped unless --app-seconds is given)
    app_seconds: float = 10.0  # one measured round (the seed app's cache TTL is 10 s)
    app_warmup: float = 2.0
    app_ttl: float = 10.0  # the app's cache TTL (the seed app's default); tests shorten it
    app_rounds: int = 1  # each round: keep-alive, then a new connection per request
    app_logouts: int = 10  # users logged out in each round, under load
    app_caches: tuple[str, ...] = ("inmemory", "shm", "shm-512", "shm-4096", "redis")
    app_dependencies: tuple[str, ...] = ("sync", "async")
    # callgrind instruction counts (issue 15): calls per operation; 0: skipped
    instruction_calls: int = 1000
    # the shared-token mix (bench/mix.py): requests per process and interleaved rounds
    mix_requests: int = 100_000
    mix_rounds: int = 3

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_E2E = ("inmemory", "shm", "shm-value", "redis", "sqlite", "postgresql")
_MULTI = ("inmemory", "shm", "shm-value", "redis", "sqlite", "postgresql")

FULL = Config(
    name="full", backends=None,
    tokens=20000, batch=100, op_seconds=1.0, min_batches=50, max_batches=2000,
    procs=(1, 2, 4, 8), multi_seconds=3.0, multi_pool=20000, multi_backends=_MULTI,
    table_capacity=65536, load_levels=tuple(i / 10 for i in range(1, 11)),
    churn_ops=2_000_000, churn_checkpoints=10,
    e2e_seconds=8.0, e2e_backends=_E2E,
    big_capacity=1_000_000,
)

QUICK = Config(
    name="quick", backends=None,
    tokens=4000, batch=100, op_seconds=0.12, min_batches=20, max_batches=400,
    procs=(1, 2, 4, 8), multi_seconds=0.4, multi_pool=2000, multi_backends=_MULTI,
    table_capacity=16384, load_levels=(0.1, 0.5, 1.0),
    churn_ops=100_000, churn_checkpoints=4,
    e2e_seconds=1.0, e2e_backends=_E2E,
    big_capacity=1_000_000,
    # No real app: its figures need rounds as long as the cache TTL (10 s), and ten
    # servers; `--quick --only app --app-seconds S` runs it anyway.
    app_seconds=0.0,
    instruction_calls=0,  # valgrind alone would take the minute: `python -m bench.instructions`
    mix_requests=20_000, mix_rounds=1,
)

# For tests/test_bench.py: every section's machinery, one backend pair, a few hundred calls.
SMOKE = Config(
    name="smoke", backends=("inmemory", "shm"),
    tokens=300, batch=20, op_seconds=0.02, min_batches=5, max_batches=20,
    procs=(1, 2), multi_seconds=0.2, multi_pool=300, multi_backends=("inmemory", "shm"),
    table_capacity=1024, load_levels=(0.1, 1.0),
    churn_ops=2000, churn_checkpoints=2,
    e2e_seconds=0.0, e2e_backends=(),
    big_capacity=10000,
    # --smoke --only app --app-seconds 1 (tests/test_bench.py): one seed/value-mode pair.
    app_seconds=0.0, app_warmup=0.0, app_logouts=2, app_caches=("inmemory", "shm-512"),
    instruction_calls=0,  # tests/test_bench.py runs `python -m bench.instructions -n` itself
    mix_requests=500, mix_rounds=1,
)

PRESETS = {c.name: c for c in (FULL, QUICK, SMOKE)}
