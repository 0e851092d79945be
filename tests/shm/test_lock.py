"""The lock under the field's conditions (issue 10): stopped holders, GIL-starved holders,
threads in every process, signal handlers that raise, pickle and time namespaces.

Every run here has no process die, so ``lock_recoveries`` must stay 0: a "recovery" would
mean a live holder was taken over. A model checks every read against what was acknowledged:
once ``invalidate`` has returned anywhere, no ``get`` that starts later returns a session
that was set before that ``invalidate`` began.
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import _workers
import pytest

from shmcache import (
    InvalidArgument,
    JsonCodec,
    PickleCodec,
    SharedMemorySessionCache,
)

FORK = multiprocessing.get_context("fork")
TOKENS = [f"tok-{i:02d}-" + "s" * 40 for i in range(24)]
# The model logs the operations on these tokens only (the check is per token, so this is
# sound), and no get that missed (nothing to check): the compiled core makes tens of
# millions of operations in a run, whose full log took 6 GB in the parent to check.
WATCHED = frozenset(TOKENS[:4])
TIMEOUT = 120.0


# -- the model workers -----------------------------------------------------------------------


def _cache_thread(cache: Any, seed: int, stop: Any, log: list[tuple[Any, ...]]) -> None:
    rng = random.Random(seed)
    now = time.monotonic_ns
    seq = 0
    while not stop.value:
        t = rng.choice(TOKENS)
        r = rng.random()
        if r < 0.35:
            seq += 1
            nonce = f"{seed}-{seq}"
            s = now()
            # Sizes from one arena unit to 60 (value mode): the allocator's free lists,
            # splits and bump pointer all run under the stops.
            cache.set(t, {"t": t, "n": nonce, "p": "x" * rng.choice((0, 40, 300, 900))}, 60.0)
            if t in WATCHED:
                log.append(("S", t, nonce, s, now()))
        elif r < 0.55:
            s = now()
            cache.invalidate(t)
            if t in WATCHED:
                log.append(("I", t, None, s, now()))
        else:
            s = now()
            got = cache.get(t)
            e = now()
            if got is not None and got["t"] != t:
                raise AssertionError(f"get({t!r}) returned another token's session {got}")
            if got is not None and t in WATCHED:
                log.append(("G", t, got["n"], s, e))


def _busy(stop: Any) -> None:
    while not stop.value:
        sum(range(2000))  # pure bytecode: holds the GIL as a FastAPI pool thread would


def model_process(
    name: str, idx: int, cache_threads: int, busy_threads: int, stop: Any, out: str
) -> None:
    """Cache threads (and maybe CPU-busy ones) until ``stop``; then write the log to ``out``
    and exit 0, or exit 70 if any thread raised."""
    try:
        cache = SharedMemorySessionCache.attach(name, lock_timeout=30.0)
        logs: list[list[tuple[Any, ...]]] = [[] for _ in range(cache_threads)]
        errors: list[str] = []

        def run(i: int) -> None:
            try:
                _cache_thread(cache, 1000 * idx + i, stop, logs[i])
            except BaseException:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(cache_threads)]
        threads += [threading.Thread(target=_busy, args=(stop,)) for _ in range(busy_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        Path(out).write_bytes(pickle.dumps([e for log in logs for e in log]))
        if errors:
            sys.stderr.write("\n".join(errors))
            os._exit(70)
    except BaseException:
        traceback.print_exc()
        os._exit(70)


def check_model(events: list[tuple[Any, ...]]) -> int:
    """Fail on any get that returned a session an earlier, completed invalidate had
    dropped; returns how many invalidates the check covered."""
    sets: dict[str, tuple[str, int]] = {}  # nonce -> (token, end of its set)
    invalidates: dict[str, list[tuple[int, int]]] = {}
    for kind, t, nonce, s, e in events:
        if kind == "S":
            sets[nonce] = (t, e)
        elif kind == "I":
            invalidates.setdefault(t, []).append((s, e))
    starts: dict[str, list[int]] = {}
    suffix_min_end: dict[str, list[int]] = {}
    for t, inv in invalidates.items():
        inv.sort()
        starts[t] = [s for s, _ in inv]
        mins = [e for _, e in inv]
        for i in range(len(mins) - 2, -1, -1):
            mins[i] = min(mins[i], mins[i + 1])
        suffix_min_end[t] = mins
    for kind, t, nonce, s, _e in events:
        if kind != "G" or nonce is None:
            continue
        token, set_end = sets[nonce]
        assert token == t
        # The first invalidate of t that began after this session's set had returned:
        i = bisect.bisect_right(starts.get(t, []), set_end)
        if i < len(starts.get(t, [])):
            dead_from = suffix_min_end[t][i]
            assert s <= dead_from, (
                f"get({t!r}) began {(s - dead_from) / 1e6:.3f} ms after an invalidate of it "
                f"had returned, and still returned the session {nonce} set before it"
            )
    return sum(len(v) for v in invalidates.values())


def run_model(
    segment_name: str, tmp_path: Path, stops: int, busy_threads: int, cache_threads: int
) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=256, value_size=1024)
    stop = FORK.RawValue("i", 0)
    rng = random.Random(20261129 + busy_threads)
    outs = [str(tmp_path / f"log-{i}.pickle") for i in range(3)]
    procs = [
        FORK.Process(
            target=model_process,
            args=(cache.name, i, cache_threads, busy_threads if i == 0 else 0, stop, outs[i]),
            daemon=True,
        )
        for i in range(3)
    ]
    try:
        for p in procs:
            p.start()
        for _ in range(stops):
            victim = rng.choice(procs)
            os.kill(victim.pid, signal.SIGSTOP)  # wherever it is: maybe holding the lock
            time.sleep(rng.uniform(0.3, 0.9))
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(rng.uniform(0.0, 0.05))
        stop.value = 1
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0, f"worker {p.pid} ended with {p.exitcode}"
        events = [e for out in outs for e in pickle.loads(Path(out).read_bytes())]
        assert check_model(events) > 100
        stats = cache.stats()
        assert stats["lock_recoveries"] == 0, "a live holder was taken over"
        assert not stats["lock_abandoned"] and stats["lock_owner"] is None
        assert cache.check() == []
    finally:
        stop.value = 1
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.join(TIMEOUT)
        cache.close()


def test_stopped_holders_are_never_taken_over(segment_name: str, tmp_path: Path) -> None:
    """(a) Three processes, three cache threads each; one of them SIGSTOPped 0.3-0.9 s at a
    random point, 60 times."""
    run_model(segment_name, tmp_path, stops=60, busy_threads=0, cache_threads=3)


def test_gil_starved_holders_are_never_taken_over(segment_name: str, tmp_path: Path) -> None:
    """(b) The same, with one process running 40 CPU-busy threads beside 8 cache threads."""
    run_model(segment_name, tmp_path, stops=20, busy_threads=40, cache_threads=8)


def test_model_check_catches_a_resurrected_session() -> None:
    """The checker itself can fail: a get after a completed invalidate returning the old
    session is reported."""
    events = [
        ("S", "t", "n1", 0, 10),
        ("I", "t", None, 20, 30),
        ("G", "t", "n1", 25, 26),  # overlapping the invalidate: allowed
    ]
    assert check_model(events) == 1
    with pytest.raises(AssertionError, match="after an invalidate"):
        check_model([*events, ("G", "t", "n1", 40, 41)])


# -- (c) threads in one process ----------------------------------------------------------------


def test_many_threads_share_one_cache_object(segment_name: str) -> None:
    """16 threads, a table much smaller than the tokens (evictions, local-map pruning):
    get, and set on a miss, for a fixed number of rounds. Zero exceptions."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=32, value_size=64)
    cache._max_local = 8  # prune the per-process map all the time
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(4000):
                t = f"tok-{rng.randrange(200)}"
                got = cache.get(t)
                if got is None:
                    cache.set(t, {"t": t}, 30.0, user_id=rng.randrange(5))
                elif got["t"] != t:
                    raise AssertionError(f"wrong session {got} for {t}")
                if rng.random() < 0.02:
                    cache.invalidate(t)
                if rng.random() < 0.002:
                    cache.invalidate_by_user(rng.randrange(5))
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT)
        assert errors == []
        assert cache.stats()["lock_recoveries"] == 0
        assert cache.check() == []
    finally:
        cache.close()


# -- (d) signal handlers that raise -------------------------------------------------------------


class Alarm(Exception):
    pass


def test_raising_signal_handler_never_leaves_the_lock_held(segment_name: str) -> None:
    """SIGALRM every 200 us into a loop of sets; the handler raises, the loop catches. After
    it, another process's set takes the lock at once (lock_timeout 0.5 s would expose a
    hold left behind) and nothing was 'recovered'."""
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=64, lock_timeout=0.5
    )
    armed = [False]

    def handler(sig: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False  # disarmed before raising: outside the try it never raises
            raise Alarm()

    old = signal.signal(signal.SIGALRM, handler)
    caught = done = 0
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        while done < 20000:
            try:
                armed[0] = True
                while done < 20000:
                    cache.set(f"tok-{done % 50}", {"n": done}, 60.0)
                    done += 1
                armed[0] = False
            except Alarm:
                caught += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    try:
        assert caught > 100, caught  # the handler really cut into the writes
        assert _workers.within(
            lambda: _in_child(lambda: cache.set("other", {"n": -1}, 60.0) or "ok")
        ) == "ok"
        assert cache.get("other") == {"n": -1}
        stats = cache.stats()
        assert stats["lock_recoveries"] == 0
        assert stats["lock_owner"] is None
        assert cache.check() == []
    finally:
        cache.close()


def _in_child(fn: Any) -> Any:
    parent_end, child_end = FORK.Pipe(duplex=False)

    def body() -> None:
        try:
            child_end.send(("ok", fn()))
        except BaseException as exc:
            child_end.send(("fail", f"{type(exc).__name__}: {exc}"))

    p = FORK.Process(target=body, daemon=True)
    p.start()
    assert parent_end.poll(TIMEOUT), "child hung"
    status, payload = parent_end.recv()
    p.join(TIMEOUT)
    assert status == "ok", payload
    return payload


def test_a_handler_that_uses_the_cache_inside_a_write_is_refused(segment_name: str) -> None:
    """Re-entry from a signal handler while this thread holds the lock: refused with a
    clear error (never a deadlock, never two interleaved writes), and the outer write is
    released by its finally."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=64)
    try:
        lock = cache._lock
        lock.refuse_reentry()
        try:
            lock.acquire()
            with pytest.raises(Exception, match="re-entered"):
                cache.set("inner", {"n": 1}, 60.0)
            assert lock.held()
        finally:
            lock.release()
        assert not lock.held()
        cache.set("after", {"n": 2}, 60.0)
        assert cache.check() == []
    finally:
        cache.close()


# -- (f) pickle and time namespaces -------------------------------------------------------------


def test_default_pickle_refused_for_segments_others_can_write(segment_name: str) -> None:
    with pytest.raises(InvalidArgument, match="unpickled"):
        SharedMemorySessionCache.create(segment_name, capacity=16, value_size=256, mode=0o666)
    assert not os.path.exists(f"/dev/shm/{segment_name}")  # refused before creating
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=16, value_size=256, mode=0o666, codec=JsonCodec()
    )
    try:
        with pytest.raises(InvalidArgument, match="unpickled"):
            SharedMemorySessionCache.attach(segment_name, allow_writable_by_others=True)
        explicit = SharedMemorySessionCache.attach(
            segment_name, allow_writable_by_others=True, codec=PickleCodec()
        )
        explicit.close()  # the caller's explicit choice is respected
        # Hash-only segments hold no values: nothing is unpickled, nothing refused.
    finally:
        cache.close()
    hash_only = SharedMemorySessionCache.create(segment_name + "-h", capacity=16, mode=0o666)
    hash_only.close()
    hash_only.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --time needs root")
def test_attach_from_another_time_namespace_is_refused(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=16)
    try:
        code = (
            "import sys\n"
            "from shmcache import SharedMemorySessionCache, IncompatibleSegment\n"
            "try:\n"
            f"    SharedMemorySessionCache.attach({segment_name!r})\n"
            "except IncompatibleSegment as exc:\n"
            "    print(exc); sys.exit(3)\n"
        )
        done = subprocess.run(
            ["unshare", "--time", "--monotonic", "86400", "--fork", sys.executable, "-c", code],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert done.returncode == 3, done.stdout + done.stderr
        assert "time namespace" in done.stdout
        # The same attach from our own namespace works.
        SharedMemorySessionCache.attach(segment_name).close()
    finally:
        cache.close()
