"""Processes that die holding the lock: SIGKILL, zombies, half-written slots, a kill storm,
a live holder, and signals during a wait.

Every recovering call runs under ``bounded()`` (a daemon thread joined with a generous
timeout), so a hang fails the test instead of hanging the run; no assertion is a
wall-clock bound.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import _workers
import pytest

from shmcache import LockTimeout, SharedMemorySessionCache
from shmcache.shm.layout import OP_CLEAR, OP_SLOT, W_JOURNAL

TIMEOUT = 30.0
FORK = multiprocessing.get_context("fork")


bounded = _workers.within  # run fn; fail (not hang) if it has not returned in time


def os_fork(body: Callable[[], None]) -> int:
    """Plain fork (no multiprocessing), so the parent decides when (if ever) to reap."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = TIMEOUT) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit in {timeout} s")
        time.sleep(0.005)


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].split()[0].decode()


def wait_for_state(pid: int, states: str, timeout: float = TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = proc_state(pid)
        if state is not None and state in states:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} never reached state {states} (is {state})")
        time.sleep(0.002)


def run_and_die(body: Callable[[], None]) -> None:
    """Run ``body`` in a forked child that must end by SIGKILLing itself; reap it."""
    p = FORK.Process(target=body, daemon=True)
    p.start()
    p.join(TIMEOUT)
    if p.is_alive():
        p.kill()
        p.join(TIMEOUT)
        raise AssertionError("child did not die")
    assert p.exitcode == -signal.SIGKILL, f"child exited with {p.exitcode}, not SIGKILL"


def read_byte(fd: int, timeout: float = TIMEOUT) -> bytes:
    """One byte from a pipe, or AssertionError if none comes in time (never blocks forever)."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise AssertionError(f"nothing to read in {timeout} s")
    return os.read(fd, 1)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


@pytest.fixture
def cache(segment_name: str) -> Any:
    c = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=128)
    yield c
    c.close()


def lock_is_free(c: SharedMemorySessionCache) -> bool:
    """Free, consistent, held by nobody: a trylock from this thread takes it at once."""
    stats = c.stats()
    if stats["lock_owner"] is not None or stats["lock_abandoned"]:
        return False
    try:
        taken = c._lock._trylock() == 0
    finally:
        c._lock.release()
    return taken


def sessions_for(c: SharedMemorySessionCache, n: int) -> dict[str, dict[str, str]]:
    sessions = {f"tok-{i}-" + "q" * 30: {"token": f"tok-{i}-" + "q" * 30} for i in range(n)}
    for t, s in sessions.items():
        c.set(t, s, 60.0)
    return sessions


# -- (a) a holder SIGKILLed by another process ----------------------------------------------


def test_holder_killed_by_sigkill_lock_recovered(cache: SharedMemorySessionCache) -> None:
    sessions = sessions_for(cache, 5)
    for round_ in range(1, 4):
        ready_r, ready_w = FORK.Pipe(duplex=False)

        def hold(w: Any = ready_w) -> None:
            cache._lock.acquire()
            w.send(os.getpid())
            time.sleep(120)

        p = FORK.Process(target=hold, daemon=True)
        p.start()
        assert ready_r.poll(TIMEOUT), "child never took the lock"
        assert ready_r.recv() == p.pid
        assert cache.stats()["lock_owner"] == p.pid
        os.kill(p.pid, signal.SIGKILL)
        p.join(TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        # Reads never needed the lock.
        assert all(cache.get(t) == s for t, s in sessions.items())
        bounded(lambda r=round_: cache.set(f"after-{r}", {"token": f"after-{r}"}, 60.0))
        assert cache.get(f"after-{round_}") == {"token": f"after-{round_}"}
        stats = cache.stats()
        assert stats["lock_recoveries"] == round_
        assert stats["lock_owner"] is None
        assert cache.check() == []
    assert lock_is_free(cache)


def test_other_processes_see_the_recovery_count(cache: SharedMemorySessionCache) -> None:
    run_and_die(lambda: (cache._lock.acquire(), die()))
    bounded(lambda: cache.invalidate("whatever"))
    other = SharedMemorySessionCache.attach(cache.name)
    try:
        assert other.stats()["lock_recoveries"] == 1
        assert other.check() == []
    finally:
        other.close()


# -- (b) the dead holder is an unreaped zombie ----------------------------------------------


def test_zombie_holder_counts_as_dead(cache: SharedMemorySessionCache) -> None:
    pid = os_fork(lambda: (cache._lock.acquire(), die()))
    try:
        wait_for_state(pid, "Z")  # dead, not reaped: kill(pid, 0) still succeeds
        os.kill(pid, 0)
        # The kernel marked the lock at the death, before the parent reaps the zombie.
        assert cache.stats()["lock_abandoned"] and cache.stats()["lock_owner"] is None
        bounded(lambda: cache.set("after-zombie", {"token": "z"}, 60.0))
        assert proc_state(pid) == "Z"  # recovered while it was still a zombie
        assert cache.get("after-zombie") == {"token": "z"}
        assert cache.stats()["lock_recoveries"] == 1
        assert cache.check() == []
    finally:
        status = reap(pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_recover_lock_frees_a_zombie_holders_lock(cache: SharedMemorySessionCache) -> None:
    assert cache.recover_lock() is False  # nothing to do
    pid = os_fork(lambda: (cache._lock.acquire(), die()))
    try:
        wait_for_state(pid, "Z")
        assert cache.recover_lock() is True
        assert cache.stats()["lock_owner"] is None
        assert cache.stats()["lock_recoveries"] == 1
        assert cache.recover_lock() is False
        assert lock_is_free(cache)
        cache.set("t", {"token": "t"}, 60.0)  # uncontended now
        assert cache.check() == []
    finally:
        reap(pid)


# -- (c) a holder killed in the middle of writing a slot ------------------------------------


def _slot_of(c: SharedMemorySessionCache, token: str) -> int:
    tag, home = c._table.tag_of(token.encode())
    slot = c._table.find(tag, home)
    assert slot >= 0
    return slot


WRITE_OPS = ["set-new", "set-overwrite", "invalidate", "clear"]
NEVER = 99  # a budget no write exhausts: the write completes, the holder dies before release


@pytest.mark.parametrize("kill_at", [*range(15), NEVER])  # a set in value mode: 14 stores
@pytest.mark.parametrize("op", WRITE_OPS)
def test_holder_killed_at_each_store_of_a_write(
    cache: SharedMemorySessionCache, op: str, kill_at: int
) -> None:
    """The real set/invalidate/clear, SIGKILLed before its n-th store to shared memory."""
    sessions = sessions_for(cache, 10)
    victim = next(iter(sessions))
    newcomer = "tok-newcomer-" + "n" * 30
    new_session = {"token": newcomer}
    reset_session = {"token": victim, "v": 2}
    status_r, status_w = FORK.Pipe(duplex=False)

    def child() -> None:
        _workers.kill_at_store(cache, None if kill_at == NEVER else kill_at)
        if op == "set-new":
            cache.set(newcomer, new_session, 60.0)
        elif op == "set-overwrite":
            cache.set(victim, reset_session, 60.0)
        elif op == "invalidate":
            cache.invalidate(victim)
        else:
            cache.clear()
        status_w.send("completed")
        die()

    run_and_die(child)
    completed = status_r.poll(0) and status_r.recv() == "completed"
    if kill_at == 0:
        assert not completed  # every write stores something
    if kill_at == NEVER:
        assert completed
    assert cache.stats()["lock_abandoned"]  # it died holding the lock

    fresh = SharedMemorySessionCache.attach(cache.name)
    try:
        readers = (cache, fresh)

        def no_wrong_session() -> None:
            for c in readers:
                for t in [*sessions, newcomer]:
                    got = c.get(t)
                    assert got is None or got["token"] == t, (t, got)

        # Before any recovery: lock-free reads never see half a slot.
        no_wrong_session()
        for c in readers:
            if op == "set-new" and not completed:
                assert c.get(newcomer) is None

        bounded(lambda: cache.set("tok-trigger", {"token": "tok-trigger"}, 60.0))
        stats = cache.stats()
        assert stats["lock_recoveries"] == 1
        assert cache.check() == []
        assert fresh.check() == []
        no_wrong_session()

        untouched = {t: s for t, s in sessions.items() if t != victim}
        for c in readers:
            if op == "clear":
                present = [c.get(t) == s for t, s in sessions.items()]
                # All or nothing: a clear is finished by the recovery, or never began.
                assert all(present) or not any(present), present
                assert not completed or not any(present)
                continue
            assert all(c.get(t) == s for t, s in untouched.items())
            if op == "set-new":
                assert c.get(newcomer) == (new_session if completed else None)
                assert c.get(victim) == sessions[victim]
            elif op == "set-overwrite":
                # Killed after its check word (freeing the old value's block, in value
                # mode) the new session is whole and published: it may be there.
                assert c.get(victim) in (
                    (reset_session,) if completed else (None, sessions[victim], reset_session)
                )
            else:
                assert c.get(victim) in ((None,) if completed else (None, sessions[victim]))

        # And every slot is writable again. (Fresh logins: the gets above took leases while
        # the dead holder's write was unfinished, which would rightly drop these sets.)
        cache._leases.forget(newcomer)
        cache._leases.forget(victim)
        cache.set(newcomer, new_session, 60.0)
        cache.set(victim, sessions[victim], 60.0)
        assert fresh.get(newcomer) == new_session
        assert fresh.get(victim) == sessions[victim]
        assert cache.check() == []
    finally:
        fresh.close()


def test_recovery_finishes_an_interrupted_removal(cache: SharedMemorySessionCache) -> None:
    """A holder killed while zeroing a slot (check and tag zeroed, meta not yet): after the
    recovery the slot is empty, not counted as 'invalid' (nor in load_factor)."""
    sessions = sessions_for(cache, 3)
    victim = next(iter(sessions))
    table = cache._table
    slot = _slot_of(cache, victim)

    def child() -> None:
        cache._lock.acquire()
        table.words[W_JOURNAL] = (OP_SLOT << 56) | slot
        table.words[table.check_word_index(slot)] = 0
        t = table.geometry.tags_offset + 16 * slot
        cache._segment.mm[t : t + 16] = bytes(16)
        die()  # before the meta word is zeroed

    run_and_die(child)
    bounded(lambda: cache.set("tok-trigger", {"token": "tok-trigger"}, 60.0))
    stats = cache.stats()
    assert stats["lock_recoveries"] == 1
    assert cache.check() == []
    assert cache.get(victim) is None
    assert stats["entries"] == 3  # two sessions left, and the trigger
    assert stats["invalid"] == 0, "recovery left a half-zeroed slot behind"
    assert stats["load_factor"] == 3 / table.geometry.physical_slots


def test_holder_died_after_a_torn_write(cache: SharedMemorySessionCache) -> None:
    """A slot whose check was stored over a value only half written (what a torn write
    looks like to a reader), journaled by a holder that then died: never readable, and
    dropped by the recovery."""
    sessions = sessions_for(cache, 5)
    newcomer = "tok-torn-" + "t" * 34

    def child() -> None:
        _workers.kill_at_store(cache, torn=1)  # the tag whole, then half the value
        cache.set(newcomer, {"token": newcomer, "pad": "p" * 40}, 60.0)
        die()

    run_and_die(child)
    fresh = SharedMemorySessionCache.attach(cache.name)
    try:
        assert fresh.get(newcomer) is None
        assert cache.get(newcomer) is None
        bounded(lambda: cache.set("tok-trigger", {"token": "tok-trigger"}, 60.0))
        assert cache.stats()["lock_recoveries"] == 1
        assert cache.check() == []
        assert fresh.get(newcomer) is None
        assert all(fresh.get(t) == s for t, s in sessions.items())
        assert cache.stats()["invalid"] == 0
    finally:
        fresh.close()


def test_holder_died_half_way_through_zeroing_checks_of_a_clear(
    cache: SharedMemorySessionCache,
) -> None:
    sessions = sessions_for(cache, 10)
    table = cache._table
    half = table.geometry.physical_slots // 2

    def child() -> None:
        cache._lock.acquire()
        table.words[W_JOURNAL] = OP_CLEAR << 56
        for slot in range(half):
            table.words[table.check_word_index(slot)] = 0
        die()

    run_and_die(child)
    for t in sessions:
        got = cache.get(t)
        assert got is None or got == sessions[t]
    bounded(lambda: cache.set("tok-trigger", {"token": "tok-trigger"}, 60.0))
    assert cache.stats()["lock_recoveries"] == 1
    assert cache.check() == []
    assert all(cache.get(t) is None for t in sessions)  # the clear was finished
    assert cache.stats()["entries"] == 1  # only the trigger
    assert cache.stats()["invalid"] == 0


# -- (d) the kill storm ---------------------------------------------------------------------

N_WRITERS = 4
STORM_EVENTS = 60


def test_kill_storm(segment_name: str) -> None:
    # A lock_timeout well above the holds: four writers hammer a 2-core machine, and the
    # mutex is not FIFO, so a waiter can be overtaken for a while (this test is about kills).
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=512, value_size=96, lock_timeout=10.0
    )
    stop = FORK.RawValue("i", 0)
    progress = FORK.RawArray("q", N_WRITERS)
    holds = [0.0, 0.0, 0.15, 0.15]  # two writers sit inside the critical section often
    rng = random.Random(20240611)
    launched = 0

    def launch(idx: int) -> Any:
        nonlocal launched
        launched += 1
        p = FORK.Process(
            target=_workers.storm_writer,
            args=(cache, 1000 * idx + launched, holds[idx], stop, progress, idx),
            daemon=True,
        )
        p.start()
        return p

    writers = [launch(i) for i in range(N_WRITERS)]
    kills = suicides = 0
    try:
        for event in range(STORM_EVENTS):
            time.sleep(rng.uniform(0.0, 0.05))
            if event % 5 == 4:
                # A kill certainly inside the critical section (maybe mid-slot).
                p = FORK.Process(target=_workers.die_holding_lock, args=(cache, event))
                p.start()
                p.join(TIMEOUT)
                assert p.exitcode == -signal.SIGKILL, p.exitcode
                suicides += 1
            else:
                idx = rng.randrange(N_WRITERS)
                victim = writers[idx]
                assert victim.exitcode is None, f"writer died by itself: {victim.exitcode}"
                os.kill(victim.pid, signal.SIGKILL)
                victim.join(TIMEOUT)
                assert victim.exitcode == -signal.SIGKILL
                kills += 1
                writers[idx] = launch(idx)
            # The parent keeps working through the storm, within the bounded wait.
            t = f"parent-{event}"
            bounded(lambda t=t: cache.set(t, {"token": t}, 60.0))
            got = cache.get(t)
            assert got is None or got == {"token": t}  # None only if a writer cleared
        before = list(progress)
        stop.value = 1
        for p in writers:
            p.join(60)
            assert p.exitcode == 0, f"writer {p.pid} ended with {p.exitcode}"
        assert all(after >= b + 300 for after, b in zip(progress, before, strict=True))  # finished
    finally:
        stop.value = 1
        for p in writers:
            if p.is_alive():
                p.kill()
                p.join(TIMEOUT)
    try:
        assert bounded(cache.check) == []
        stats = cache.stats()
        why = f"{kills} kills, {suicides} suicides, {stats}"
        assert stats["lock_owner"] is None and not stats["lock_abandoned"], why
        assert stats["lock_recoveries"] >= suicides >= 1, why
        # Recoveries only of dead holders: never more than the processes that died.
        assert stats["lock_recoveries"] <= kills + suicides, why
        assert lock_is_free(cache)
        fresh = SharedMemorySessionCache.attach(segment_name)
        try:
            for t in _workers.STORM_TOKENS + [f"parent-{i}" for i in range(STORM_EVENTS)]:
                got = fresh.get(t)
                assert got is None or got["token"] == t, (t, got)
            fresh.set("post-storm", {"token": "post-storm"}, 60.0)
            assert cache.get("post-storm") == {"token": "post-storm"}
        finally:
            fresh.close()
    finally:
        cache.close()


# -- (e) a live owner -----------------------------------------------------------------------


def test_live_owner_causes_lock_timeout_not_recovery(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, lock_timeout=0.3)
    try:
        cache.set("before", {"token": "before"}, 60.0)
        to_child_r, to_child_w = FORK.Pipe(duplex=False)
        to_parent_r, to_parent_w = FORK.Pipe(duplex=False)

        def hold() -> None:
            cache._lock.acquire()
            to_parent_w.send("held")
            if to_child_r.poll(TIMEOUT):
                to_child_r.recv()
            cache._lock.release()
            to_parent_w.send("released")
            to_child_r.poll(TIMEOUT)  # stay alive (not a zombie) until told

        p = FORK.Process(target=hold, daemon=True)
        p.start()
        try:
            assert to_parent_r.poll(TIMEOUT) and to_parent_r.recv() == "held"
            with pytest.raises(LockTimeout, match=str(p.pid)):
                bounded(lambda: cache.set("blocked", {"token": "blocked"}, 60.0))
            with pytest.raises(TimeoutError):
                bounded(lambda: cache.invalidate("some-other-token"))
            assert cache.recover_lock() is False
            assert cache.get("before") == {"token": "before"}  # reads need no lock
            assert cache.get("blocked") is None  # the failed set changed nothing
            assert cache.stats()["lock_owner"] == p.pid
            to_child_w.send("release")
            assert to_parent_r.poll(TIMEOUT) and to_parent_r.recv() == "released"
            bounded(lambda: cache.set("after", {"token": "after"}, 60.0))
            assert cache.get("after") == {"token": "after"}
            assert cache.stats()["lock_recoveries"] == 0
            assert cache.check() == []
        finally:
            to_child_w.send("exit")
            to_child_w.send("exit")  # the child may still be waiting for its first message
            p.join(TIMEOUT)
        assert p.exitcode == 0
    finally:
        cache.close()


# -- (f) signals during a wait --------------------------------------------------------------


def _blocked_setter(
    cache: SharedMemorySessionCache, signum: int, raise_exit: bool, conn: Any, hits_fd: int
) -> None:
    """Install a handler, then block in set() on a lock someone else holds; tell the parent
    from inside the wait loop (so the signal certainly arrives during the wait)."""

    def handler(sig: int, frame: Any) -> None:
        os.write(hits_fd, b"x")
        if raise_exit:
            raise SystemExit(7)

    signal.signal(signum, handler)
    told = []

    def waiting() -> None:
        if not told:
            told.append(1)
            conn.send("waiting")

    _workers.on_lock_wait(cache, waiting)
    cache.set("tok-signalled", {"token": "tok-signalled"}, 60.0)
    conn.send(("done", cache.get("tok-signalled")))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_handler_systemexit_escapes_the_wait(segment_name: str, signum: int) -> None:
    # lock_timeout far beyond the join timeout: only the signal can end the wait in time.
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=64, lock_timeout=600.0
    )
    hits_r, hits_w = os.pipe()
    try:
        cache._lock.acquire()  # a live holder: this process
        try:
            conn_r, conn_w = FORK.Pipe(duplex=False)
            p = FORK.Process(
                target=_blocked_setter, args=(cache, signum, True, conn_w, hits_w), daemon=True
            )
            p.start()
            assert conn_r.poll(TIMEOUT) and conn_r.recv() == "waiting"
            os.kill(p.pid, signum)
            p.join(TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join(TIMEOUT)
                raise AssertionError("the signalled process hung in set()")
            assert p.exitcode == 7
            assert read_byte(hits_r) == b"x"
            assert cache.stats()["lock_owner"] == os.getpid()  # untouched by the child
        finally:
            cache._lock.release()
        assert cache.get("tok-signalled") is None
        cache.set("after", {"token": "after"}, 60.0)
        assert cache.stats()["lock_recoveries"] == 0
        assert lock_is_free(cache)
        assert cache.check() == []
    finally:
        os.close(hits_r)
        os.close(hits_w)
        cache.close()


def test_signal_handler_that_returns_does_not_break_the_wait(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=64, lock_timeout=600.0
    )
    hits_r, hits_w = os.pipe()
    try:
        cache._lock.acquire()
        conn_r, conn_w = FORK.Pipe(duplex=False)
        p = FORK.Process(
            target=_blocked_setter,
            args=(cache, signal.SIGUSR1, False, conn_w, hits_w),
            daemon=True,
        )
        p.start()
        try:
            assert conn_r.poll(TIMEOUT) and conn_r.recv() == "waiting"
            for _ in range(3):
                os.kill(p.pid, signal.SIGUSR1)
                assert read_byte(hits_r) == b"x"  # the handler ran, during the wait
            assert p.is_alive() and not conn_r.poll(0)  # still waiting for the lock
        finally:
            cache._lock.release()
        assert conn_r.poll(TIMEOUT), "set() never completed after the lock was released"
        assert conn_r.recv() == ("done", {"token": "tok-signalled"})
        p.join(TIMEOUT)
        assert p.exitcode == 0
        assert cache.get("tok-signalled") == {"token": "tok-signalled"}
        assert cache.stats()["lock_recoveries"] == 0
        assert lock_is_free(cache)
        assert cache.check() == []
    finally:
        os.close(hits_r)
        os.close(hits_w)
        cache.close()


# -- (g) recovery touches only what the journal names -------------------------------------


def test_recovery_leaves_whole_entries_exactly_as_they_were(
    cache: SharedMemorySessionCache,
) -> None:
    """A recovery repairs only what the journal names: every whole slot keeps its exact
    bytes (tag, meta, check, value)."""
    sessions_for(cache, 8)
    table = cache._table
    n = table.geometry.physical_slots
    before = [table.read_slot(s) for s in range(n)]
    assert sum(snap is not None for snap in before) == 8
    run_and_die(lambda: (cache._lock.acquire(), die()))
    bounded(cache.purge)
    assert cache.stats()["lock_recoveries"] == 1
    assert [table.read_slot(s) for s in range(n)] == before
