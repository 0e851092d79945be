"""What the real app's workers count, and how the driver reads it (bench layer).

Every worker of ``bench.fastapi_app`` owns two files in the state directory the driver
gives it (``BENCH_STATE``), named by its pid, so no two processes ever write one file:

* ``counters-PID.bin``: ``FIELDS`` as little-endian unsigned 64-bit integers, updated in
  place through ``mmap`` (the driver sees every increment at once, with no endpoint to
  reach: gunicorn hands a connection to whichever worker accepts it, so asking each worker
  over HTTP is a lottery);
* ``accepts-PID.log``: one line ``USER_ID START_NS END_NS HOW`` per request of a
  *watched* user (one the driver will log out) that the app accepted: ``START_NS`` taken
  *before* the cache lookup, ``END_NS`` after it (and after the ``set``), ``HOW`` ``h``
  (a cache hit) or ``v`` (validated against the database, then ``set``).
  ``CLOCK_MONOTONIC`` is one clock for every process of the host, so a line that starts
  after the instant the logout returned is, without doubt, a request accepted after the
  logout; a ``v`` line that starts before it and ends after it is a validation that
  overlapped the logout (its ``set`` may have landed after the ``invalidate``).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
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

    def accepted(self, user_id: int, before_lookup_ns: int, validated: bool) -> None:
        if user_id in self.watched:
            line = (f"{user_id} {before_lookup_ns} {time.monotonic_ns()} "
                    f"{'v' if validated else 'h'}\n")
            os.write(self._log, line.encode())


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


Accept = tuple[int, int, int, bool]  # user, start ns, end ns, validated


def read_accepts(state_dir: str | Path) -> list[Accept]:
    """Every logged acceptance of a watched user."""
    out = []
    for path in Path(state_dir).glob("accepts-*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:  # a line being written has no end yet
                out.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3] == "v"))
    return out


def stale_acceptances(accepts: list[Accept], logged_out: dict[int, int],
                      until_ns: int) -> dict[str, Any]:
    """Requests accepted after their logout returned (lookup started after the logout's
    ``done`` instant and before ``until_ns``, the end of the round), and validations that
    overlapped a logout (began before it returned, ended after it): each may have cached
    the session after the logout's ``invalidate``, the race of issue 11."""
    late: dict[int, list[int]] = {}
    overlapping = 0
    for user, start, end, validated in accepts:
        done = logged_out.get(user)
        if done is None:
            continue
        if done < start <= until_ns:
            late.setdefault(user, []).append(start - done)
        elif validated and start < done < end:
            overlapping += 1
    longest = max((max(v) for v in late.values()), default=0)
    return {
        "logouts": len(logged_out),
        "accepted_after_logout": sum(len(v) for v in late.values()),
        "users": len(late),
        "longest_ms": longest / 1e6,
        "overlapping_validations": overlapping,
    }
