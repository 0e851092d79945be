"""gunicorn settings for the end-to-end and real-app benchmarks (``-c bench/gunicorn_conf.py``;
the command line adds ``-w``, ``-b`` and, for the real app, ``-k``).

For the shmcache backends the master creates the segment before forking, through the
package's own hooks (``shmcache.gunicorn``) when they exist, else through a minimal
``on_starting``/``on_exit`` pair on the public API.
"""

from __future__ import annotations

import os
from typing import Any

workers = 4
worker_class = "sync"
accesslog = None
loglevel = "warning"
proc_name = "shmcache-bench"

# bench.e2e says BENCH_BACKEND; bench.app (any worker class) says BENCH_SHM_HOOKS=1.
if (os.environ.get("BENCH_BACKEND") in ("shm", "shm-value")
        or os.environ.get("BENCH_SHM_HOOKS") == "1"):
    try:
        from shmcache.gunicorn import child_exit, on_exit, on_starting  # noqa: F401
    except ImportError:
        from shmcache import SharedMemorySessionCache

        _created: list[SharedMemorySessionCache] = []

        def on_starting(server: Any) -> None:
            _created.append(SharedMemorySessionCache.create(
                os.environ["SHMCACHE_NAME"],
                capacity=int(os.environ.get("SHMCACHE_CAPACITY", "65536")),
                value_size=int(os.environ.get("SHMCACHE_VALUE_SIZE", "0")),
            ))

        def on_exit(server: Any) -> None:
            for cache in _created:
                cache.unlink()
                cache.close()
