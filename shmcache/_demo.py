"""``shmcache demo``: two worker processes, one logout, with the seed's cache and with ours.

Each worker is a real process that answers "is this token logged in?" from its own cache
object, the way a gunicorn worker's auth dependency does. A user logs in (both workers
cache the validated session), logs out through worker A, and then asks worker B.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
from multiprocessing.connection import Connection
from typing import Any

from ._memory import InMemorySessionCache
from ._shm import SharedMemorySessionCache


def _worker(conn: Connection, backend: str, name: str) -> None:
    cache: Any = (
        InMemorySessionCache() if backend == "memory" else SharedMemorySessionCache.attach(name)
    )
    while True:
        op, token = conn.recv()
        if op == "stop":
            break
        if op == "login":  # the auth dependency: a miss, validated "against the database"
            if cache.get(token) is None:
                cache.set(token, {"user": "alice", "token_prefix": token[:6]}, 60)
            conn.send("ok")
        elif op == "logout":
            cache.invalidate(token)
            conn.send("ok")
        elif op == "request":
            conn.send("accepted" if cache.get(token) is not None else "rejected (401)")
    conn.close()


def _scenario(backend: str, name: str) -> list[tuple[str, str]]:
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, backend, name), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    a, b = pipes
    token = secrets.token_urlsafe(32)
    steps = []
    try:
        for conn in pipes:
            conn.send(("login", token))
            conn.recv()
        for label, conn in (("worker A", a), ("worker B", b)):
            conn.send(("request", token))
            steps.append((f"request to {label} after login", conn.recv()))
        a.send(("logout", token))
        a.recv()
        steps.append(("logout handled by worker A", "done"))
        for label, conn in (("worker A", a), ("worker B", b)):
            conn.send(("request", token))
            steps.append((f"request to {label} after logout", conn.recv()))
    finally:
        for conn in pipes:
            conn.send(("stop", ""))
        for proc in procs:
            proc.join(10)
    return steps


def run() -> int:
    """Run both scenarios and print what each worker answered."""
    name = f"shmcache-demo-{os.getpid()}"
    # With a value area, a session validated by one worker is a hit in the other, as in a
    # deployment that spreads one user's requests over every worker.
    cache = SharedMemorySessionCache.create(name, capacity=1024, value_size=256)
    try:
        results = {
            "InMemorySessionCache (the seed)": _scenario("memory", name),
            "SharedMemorySessionCache": _scenario("shm", name),
        }
    finally:
        cache.unlink()
        cache.close()
    width = max(len(step) for steps in results.values() for step, _ in steps)
    for backend, steps in results.items():
        print(f"\n{backend}")
        for step, answer in steps:
            print(f"  {step:<{width}}  {answer}")
    stale = results["InMemorySessionCache (the seed)"][-1][1] == "accepted"
    fixed = results["SharedMemorySessionCache"][-1][1] != "accepted"
    print()
    if stale:
        print("The seed's per-process cache still accepts the token in worker B after logout.")
    if fixed:
        print("shmcache: the logout seen by worker A is seen by worker B.")
    return 0 if fixed else 1
