"""Processes that start at the same instant all end up on one segment (issue 12).

uvicorn's own ``--workers`` spawns every worker at once, and each one calls ``get_cache()``
(or ``open_cache("shm://...")``): one creates the segment, the others must wait for it to be
whole and attach, not fail with "exists but its semaphore does not" (seen in 22 of 40 starts
of a 4-process race before the fix). Eight spawned processes, twenty rounds, each round a
fresh name and every process released by one barrier; the parent then checks that all eight
wrote into the same segment and that nobody saw an error.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from shmcache import SharedMemorySessionCache

PROCESSES = 8
ROUNDS = 20
TIMEOUT = 60.0  # turns a hang into a failure; no test relies on it being short


class _FakeArbiter:
    """What ``on_starting`` reads from gunicorn's arbiter: ``cfg`` and ``log``."""

    class cfg:
        proc_name = "app"
        uid = os.geteuid()
        gid = os.getegid()

    class log:
        @staticmethod
        def info(*args: Any) -> None:
            pass


def _open(path: str, name: str) -> Any:
    if path == "open_cache":
        from shmcache import open_cache

        return open_cache(f"shm://{name}?capacity=64&value_size=64")
    from shmcache import gunicorn

    old, gunicorn._cache = gunicorn._cache, None  # a new process start, as far as it knows
    if old is not None:
        old.close()
    gunicorn.configure(name=name, capacity=64, value_size=64)
    if path == "get_cache":
        return gunicorn.get_cache()
    gunicorn.on_starting(_FakeArbiter())  # several masters starting together
    return gunicorn.get_cache()


def _starter(path: str, barrier: Any, conn: Any) -> None:
    """Each round: receive a name, wait for everybody, open it, write one session."""
    while True:
        name = conn.recv()
        if name is None:
            return
        try:
            barrier.wait(TIMEOUT)
            cache = _open(path, name)
            cache.set(f"started-{os.getpid()}", os.getpid(), 600)
            conn.send("ok")
        except BaseException:
            conn.send(traceback.format_exc(limit=3))


@pytest.mark.parametrize("path", ["get_cache", "open_cache", "on_starting"])
def test_processes_starting_together_share_one_segment(
    path: str, make_name: Callable[[], str]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    pipes, procs = [], []
    for _ in range(PROCESSES):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_starter, args=(path, barrier, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    errors: list[str] = []
    try:
        for _ in range(ROUNDS):
            name = make_name()
            for conn in pipes:
                conn.send(name)
            for conn, proc in zip(pipes, procs, strict=True):
                assert conn.poll(TIMEOUT), f"process {proc.pid} did not start in {TIMEOUT} s"
                answer = conn.recv()
                if answer != "ok":
                    errors.append(answer)
            with SharedMemorySessionCache.attach(name) as cache:
                entries = cache.stats()["entries"]
                assert cache.check() == []
            assert errors or entries == PROCESSES, f"{entries} sessions: not one segment"
        assert not errors, f"{len(errors)} of {PROCESSES * ROUNDS} starts failed:\n" + "\n".join(
            errors[:3]
        )
    finally:
        for conn in pipes:
            conn.send(None)
        for proc in procs:
            proc.join(TIMEOUT)
            if proc.is_alive():
                proc.kill()
    assert [p.exitcode for p in procs] == [0] * PROCESSES
