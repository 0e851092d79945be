"""What the real app's workers count, and how the driver reads it (bench layer).

Every worker of ``bench.fastapi_app`` owns two files in the state directory the driver
gives it (``BENCH_STATE``), named by its pid, so no two processes ever write one file:

* ``counters-PID.bin``: ``FIELDS`` as little-endian unsigned 64-bit integers, updated in
  place through ``mmap`` (the driver sees every increment at once, with no endpoint to
  reach: gunicorn hands a connection to whichever worker accepts it, so asking each worker
  over HTTP is a lottery);
* ``accepts-PID.log``: one line ``USER_ID MONOTONIC_NS`` per request of a *watched* user
  (one the driver will log out) that the app accepted, the time taken *before* the
  cache lookup. ``CLOCK_MONOTONIC`` is one clock for every process of the host, so a line
  whose time is later than the instant the logout returned is, without doubt, a request
  accepted after the logout.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Any

FIELDS = (
    "requests",  # requests that ran the auth dependency (GET /me, POST /logout)
    "hits",  # the cache answered
    "db_lookups",  # the database was asked (a miss with a well-signed token)
    "db_found",  # ... and the session was there: a validation, then cache.set
    "rejected",  # 401: bad signature or no such session (a logged-out token)
    "logouts",  # POST /logout done: row deleted, cache.invalidate returned
)
_FORMAT = struct.Struct("<" + "Q" * len(FIELDS))
INDEX = {name: i for i, name in enumerate(FIELDS)}


class WorkerCounters:
    """This process's counters and acceptance log (app side). Thread-safe: the sync
    dependency runs in a thread pool."""

    def __init__(self, state_dir: str | Path, watched: frozenset[int]) -> None:
        self._dir = Path(state_dir)
        self.watched = watched
        self._guard = threading.Lock()
        self._open()
        # gunicorn forks workers from the master: a worker must not write the master's files.
        os.register_at_fork(after_in_child=self._open)

    def _open(self) -> None:
        pid = os.getpid()
        fd = os.open(self._dir / f"counters-{pid}.bin", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _FORMAT.size)
            self._map = mmap.mmap(fd, _FORMAT.size)
        finally:
            os.close(fd)
        self._values = [0] * len(FIELDS)
        # O_APPEND: each os.write of a short line lands whole, whichever thread writes it.
        self._log = os.open(self._dir / f"accepts-{pid}.log",
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def add(self, *names: str) -> None:
        with self._guard:
            for name in names:
                self._values[INDEX[name]] += 1
            _FORMAT.pack_into(self._map, 0, *self._values)

    def accepted(self, user_id: int, before_lookup_ns: int) -> None:
        if user_id in self.watched:
            os.write(self._log, f"{user_id} {before_lookup_ns}\n".encode())


def read_counters(state_dir: str | Path) -> dict[int, dict[str, int]]:
    """Every worker's counters (driver side), by pid."""
    out = {}
    for path in Path(state_dir).glob("counters-*.bin"):
        data = path.read_bytes()
        if len(data) < _FORMAT.size:  # a worker between create and ftruncate
            continue
        pid = int(path.stem.split("-", 1)[1])
        out[pid] = dict(zip(FIELDS, _FORMAT.unpack_from(data), strict=True))
    return out


def delta(before: dict[int, dict[str, int]],
          after: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """Per worker, what happened between two ``read_counters`` (a worker that started in
    between counts from zero)."""
    zero = dict.fromkeys(FIELDS, 0)
    return {pid: {k: v - before.get(pid, zero)[k] for k, v in now.items()}
            for pid, now in after.items()}


def total(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    return {k: sum(c[k] for c in per_worker.values()) for k in FIELDS}


def read_accepts(state_dir: str | Path) -> list[tuple[int, int]]:
    """Every logged acceptance of a watched user: ``(user_id, monotonic_ns)``."""
    out = []
    for path in Path(state_dir).glob("accepts-*.log"):
        for line in path.read_text().splitlines():
            user, _, t = line.partition(" ")
            if t:
                out.append((int(user), int(t)))
    return out


def stale_acceptances(accepts: list[tuple[int, int]], logged_out: dict[int, int],
                      until_ns: int) -> dict[str, Any]:
    """Requests accepted after their logout returned: lookup started after the logout's
    ``done`` instant and before ``until_ns`` (the end of the round)."""
    late: dict[int, list[int]] = {}
    for user, t in accepts:
        done = logged_out.get(user)
        if done is not None and done < t <= until_ns:
            late.setdefault(user, []).append(t - done)
    longest = max((max(v) for v in late.values()), default=0)
    return {
        "logouts": len(logged_out),
        "accepted_after_logout": sum(len(v) for v in late.values()),
        "users": len(late),
        "longest_ms": longest / 1e6,
    }
