"""Real processes and threads on one database: a logout in one of 4 processes reaches all,
threads share one cache object, a forked child never uses its parent's connection, and a
writer SIGKILLed in the middle of a transaction leaves nothing half-done."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import _workers
import pytest

from shmcache import CacheUnavailable, open_cache

from ._pg_support import Host, PostgresServer, session_user

TIMEOUT = _workers.TIMEOUT
within = _workers.within
FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, pg_table: str) -> str:
    """A database URL with the test's own table (``open_cache`` form)."""
    if request.param == "sqlite":
        return f"{request.getfixturevalue('sqlite_file')}?table={pg_table}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return f"{server.url()}&table={pg_table}"


@pytest.fixture
def cache(url: str) -> Iterator[Any]:
    c = open_cache(url)
    yield c
    c.close()


def test_logout_reaches_every_process(url: str) -> None:
    hosts = [Host(url, user_id_of=session_user) for _ in range(4)]
    try:
        hosts[0]("set", "tok", {"user": "alice"}, 60)
        assert [h("get", "tok") for h in hosts] == [{"user": "alice"}] * 4
        hosts[2]("invalidate", "tok")  # the logout, handled by one worker
        assert [h("get", "tok") for h in hosts] == [None] * 4
        for i, h in enumerate(hosts):
            h("set", f"device-{i}", {"user": "bob", "device": i}, 60)
            h("set", f"other-{i}", {"user": "carol"}, 60)
        assert hosts[3]("invalidate_by_user", "bob") == 4
        for h in hosts:
            assert [h("get", f"device-{i}") for i in range(4)] == [None] * 4
            assert h("get", "other-0") == {"user": "carol"}
        hosts[1]("clear")
        assert [h("get", "other-3") for h in hosts] == [None] * 4
    finally:
        for h in hosts:
            h.stop()


def _connection_id(cache: Any) -> Any:
    """Which connection serves this call: the server's backend pid (PostgreSQL) or the
    sqlite3 connection object's id."""
    if cache.dialect == "postgresql":
        return cache._store.run(lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    return cache._store.run(id)


def _connections(cache: Any) -> set[Any]:
    """Every connection this process's cache holds: for PostgreSQL, as the server sees them
    (the backends of the test's own ``application_name``)."""
    if cache.dialect == "postgresql":
        rows = cache._store.run(lambda conn: conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = "
            "current_setting('application_name')").fetchall())
        return {pid for (pid,) in rows}
    ids = {_connection_id(cache)}
    return ids | {id(conn) for conn in cache._store._pool._idle}


def test_threads_share_one_cache(url: str) -> None:
    """16 threads on one object: each sees its own writes and logouts at once, and never
    another token's session; leases are per thread (a thread's set after its own miss and
    its own logout is dropped, exactly when the model says); connections stay bounded by
    the pool."""
    errors: list[str] = []
    shared = [f"shared-{i}" for i in range(10)]
    users = ("u0", "u1")
    # No lease expires during the test, however slow the machine: the model has no clock.
    # Nor does a write wait out the busy timeout (1 s by default): 16 threads of one process
    # take turns on SQLite's single writer lock, whose waiters poll (up to 100 ms apart) and
    # lose to newcomers, and on a loaded 2-core machine one waited > 1 s ("database is
    # locked"). This test is about threads sharing one object; test_sql_failures.py tests
    # the timeout itself.
    cache = open_cache(url, lease_timeout=3600, timeout=10)

    def worker(w: int) -> None:
        rng = random.Random(w)
        leases: dict[str, bool] = {}  # this thread's leases on its tokens: voided yet?
        try:
            for n in range(120):
                mine = f"t-{w}-{rng.randrange(15)}"
                r = rng.random()
                if r < 0.35:
                    s = {"token": mine, "n": n}
                    voided = leases.pop(mine, False)
                    cache.set(mine, s, 60)
                    if cache.get(mine) != (None if voided else s):
                        errors.append(f"{w}/{n}: set of {mine} (lease voided: {voided})")
                    if voided:
                        leases[mine] = False  # that get missed: a new lease
                elif r < 0.55:
                    cache.invalidate(mine)
                    if mine in leases:
                        leases[mine] = True
                    if cache.get(mine) is not None:
                        errors.append(f"{w}/{n}: {mine} alive after own invalidate")
                    leases.setdefault(mine, False)  # a miss; an older lease is kept
                elif r < 0.75:
                    t = rng.choice(shared)
                    cache.set(t, {"token": t, "w": w}, 60, user_id=rng.choice(users))
                elif r < 0.78:
                    cache.invalidate_by_user(rng.choice(users))
                else:
                    t = rng.choice(shared)
                    v = cache.get(t)
                    if v is not None and v.get("token") != t:
                        errors.append(f"{w}/{n}: {t} -> {v!r}")
        except Exception:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 4)
        assert not t.is_alive(), "a thread hung"
    assert errors == []
    assert cache.check() == []
    if cache.dialect == "postgresql":
        from shmcache.sql.postgres import POOL_MAX

        assert 1 <= cache._store._pool.get_stats()["pool_size"] <= POOL_MAX
    else:
        assert len(cache._store._pool._idle) <= 8
    cache.close()


def _child_after_fork(cache: Any, parents: set[Any], conn: Any) -> None:
    try:
        found = cache.get("tok")
        cache.set("child", "c", 60)
        mine = _connection_id(cache)
        conn.send(("ok", found, mine, mine not in parents))
    except BaseException:
        conn.send(("err", traceback.format_exc(), None, None))
    conn.close()
    # a normal exit: finalizers and atexit run, and must leave the parent's connections be


def test_forked_child_never_uses_the_parent_connection(url: str) -> None:
    """gunicorn's preload: the master uses the cache, then forks workers."""
    cache = open_cache(url + f"&application_name=fork-test-{os.getpid()}-{time.time_ns()}"
                       if "postgresql" in url else url)
    cache.set("tok", "s", 60)
    before = _connections(cache)
    for _ in range(3):  # three workers, one after the other, each exiting normally
        parent_end, child_end = FORK.Pipe()
        proc = FORK.Process(target=_child_after_fork, args=(cache, before, child_end))
        proc.start()
        child_end.close()
        assert parent_end.poll(TIMEOUT)
        status, found, theirs, different = parent_end.recv()
        assert status == "ok", found
        assert found == "s" and different, (before, theirs)
        proc.join(TIMEOUT)
        assert proc.exitcode == 0
        # The parent's own connections survived the child's exit, and still work (the
        # pool may have grown one in the background meanwhile: a superset).
        for _ in range(len(before) + 1):
            assert cache.get("child") == "c"
        assert before <= _connections(cache)
    cache.invalidate("tok")
    assert cache.get("tok") is None
    cache.close()


# -- SIGKILL --------------------------------------------------------------------------------


def _die_in_transaction(url: str, conn: Any) -> None:
    """Start clearing the table and writing a bogus row, uncommitted; wait to be killed."""
    cache = open_cache(url)

    def hold(db: Any) -> None:
        table = cache.table
        if cache.dialect == "sqlite":
            db.execute("BEGIN IMMEDIATE")
            bogus = "INSERT INTO {} VALUES (?, NULL, ?, ?)"
        else:
            db.execute("BEGIN")
            bogus = "INSERT INTO {} VALUES (%s, NULL, %s, %s)"
        db.execute(f"DELETE FROM {table}")
        db.execute(bogus.format(table), (b"x" * 16, 2**62, b"bogus"))
        conn.send("in")
        time.sleep(600)

    cache._store.run(hold)


def test_writer_killed_mid_transaction(url: str, cache: Any) -> None:
    cache.set("tok", "s", 60, user_id="u")
    impatient = open_cache(url, timeout=0.3)
    parent_end, child_end = FORK.Pipe()
    proc = FORK.Process(target=_die_in_transaction, args=(url, child_end))
    proc.start()
    try:
        assert parent_end.poll(TIMEOUT) and parent_end.recv() == "in"
        with pytest.raises(CacheUnavailable):  # it really holds the write lock
            within(lambda: impatient.invalidate("tok"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(TIMEOUT)
        assert proc.exitcode == -signal.SIGKILL
        # Nothing of it committed, and its locks died with it.
        assert within(lambda: cache.get("tok")) == "s"
        within(lambda: cache.set("tok2", "t", 60))
        assert within(lambda: cache.check()) == []
        assert cache.stats()["entries"] == 2
        within(lambda: impatient.invalidate("tok"))
        assert cache.get("tok") is None
    finally:
        impatient.close()
        if proc.is_alive():
            proc.kill()


EXIT_WRONG_SESSION, EXIT_STALE, EXIT_ERROR = 3, 5, 4
STORM_TOKENS = [f"storm-{i}" for i in range(64)]


def _storm(cache: Any, seed: int, progress: Any, idx: int) -> None:
    """Random calls on a cache inherited by fork (so it must open its own connections),
    until killed; exits with a code saying what went wrong, if anything did."""
    rng = random.Random(seed)
    pid = os.getpid()
    try:
        while True:
            t = rng.choice(STORM_TOKENS)
            r = rng.random()
            if r < 0.5:
                cache.set(t, {"token": t, "pid": pid}, rng.choice([0.05, 60.0]),
                          user_id=rng.choice("ab"))
            elif r < 0.75:
                cache.invalidate(t)
                v = cache.get(t)  # another writer may have set it since, but not we
                if v is not None and (v["token"] != t or v["pid"] == pid):
                    os._exit(EXIT_STALE)
            elif r < 0.77:
                cache.invalidate_by_user(rng.choice("ab"))
            elif r < 0.775:
                cache.clear()
            else:
                v = cache.get(t)
                if v is not None and v.get("token") != t:
                    os._exit(EXIT_WRONG_SESSION)
            progress[idx] += 1
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_ERROR)


def test_kill_storm(cache: Any) -> None:
    """Writers SIGKILLed at random moments, mid-statement and mid-transaction included:
    the survivors never block for good, and the table is whole afterwards."""
    cache.set("before", "b", 600)  # the parent's own connection exists before the forks
    rng = random.Random(1)
    progress = FORK.Array("q", 32, lock=False)
    procs: dict[int, Any] = {}
    started = 0

    def start() -> None:
        nonlocal started
        idx = started % 32
        progress[idx] = 0
        p = FORK.Process(target=_storm, args=(cache, 1000 + started, progress, idx))
        p.start()
        procs[idx] = p
        started += 1

    for _ in range(3):
        start()
    kills = 0
    deadline = time.monotonic() + TIMEOUT * 4
    while kills < 12:
        assert time.monotonic() < deadline, "the storm made no progress"
        idx = rng.choice(list(procs))
        if progress[idx] < rng.randrange(5, 60):
            time.sleep(0.005)
            continue
        victim = procs.pop(idx)
        if victim.is_alive():
            os.kill(victim.pid, signal.SIGKILL)
        victim.join(TIMEOUT)
        assert victim.exitcode == -signal.SIGKILL, f"a writer exited with {victim.exitcode}"
        kills += 1
        start()
    for p in procs.values():
        os.kill(p.pid, signal.SIGKILL)
        p.join(TIMEOUT)
        assert p.exitcode == -signal.SIGKILL, f"a writer exited with {p.exitcode}"
    assert within(cache.check) == []
    within(lambda: cache.set("after", "a", 60))
    assert cache.get("after") == "a"
    assert cache.get("before") in ("b", None)  # a writer's clear may have taken it
    within(lambda: cache.invalidate("after"))
    assert cache.get("after") is None
