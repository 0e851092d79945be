"""The compiled core (``shm/_fast.c``) against the pure-Python reference (issue 15).

* Which implementation an object uses: ``SHMCACHE_PURE_PYTHON`` and ``stats()``; under CI
  the compiled core must be there (or the second run of the suite would test nothing new).
* The same stores: one sequence of operations applied to two segments with the same keys
  and the same clock, one through each implementation, leaves byte-identical tables and
  header words after every step (hypothesis picks the sequences).
* Mixed processes on one segment under load (threads, SIGSTOPs): the logout model of
  ``test_lock`` holds, nothing is "recovered", ``check()`` is clean.
* A holder of either implementation killed mid-write is recovered by the other.
* Installing without a C compiler works: the build says so and pure Python runs.

The rest of the suite runs twice (``.ci/run``): once with the compiled core, once with
``SHMCACHE_PURE_PYTHON=1``; the crash, corruption, signal and thread tests drive both.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import _workers
import posix_ipc
import pytest
from _clock import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmcache import JsonCodec, SharedMemorySessionCache
from shmcache.shm import construct as shm_construct
from shmcache.shm import fast
from shmcache.shm.layout import (
    HEADER_SIZE,
    W_CLEARED_AT,
    W_CLEARS,
    W_EVICTIONS,
    W_GEN,
    W_JOURNAL,
    W_LEASE_DROPS,
    W_OVERSIZE,
    W_WRITING,
)

FORK = multiprocessing.get_context("fork")
TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parents[2]

needs_c = pytest.mark.skipif(
    not fast.compiled_available(),
    reason=f"{fast.UNAVAILABLE}: pip install -e . on a machine with a C compiler builds it",
)


def made_as(pure: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` (create or attach) with the compiled core forbidden or allowed."""
    with mock.patch.dict(os.environ, {fast.ENV: "1" if pure else "0"}):
        return fn(*args, **kwargs)


def _unlink(name: str) -> None:
    for fn in (posix_ipc.unlink_shared_memory, posix_ipc.unlink_semaphore):
        with contextlib.suppress(posix_ipc.ExistentialError):
            fn("/" + name)


# -- which implementation --------------------------------------------------------------------


def test_implementation_follows_the_environment(segment_name: str, monkeypatch: Any) -> None:
    if os.environ.get("CI") and not fast.pure_python_forced():
        assert fast.compiled_available(), fast.UNAVAILABLE  # else "both ways" would be one way
    expected = "c" if fast.compiled_available() else "python"
    monkeypatch.setenv(fast.ENV, "1")
    a = SharedMemorySessionCache.create(segment_name, capacity=16)
    monkeypatch.setenv(fast.ENV, "0")
    b = SharedMemorySessionCache.attach(segment_name)
    monkeypatch.delenv(fast.ENV)
    c = SharedMemorySessionCache.attach(segment_name)
    monkeypatch.setenv(fast.ENV, "")
    d = SharedMemorySessionCache.attach(segment_name)
    try:
        assert a.stats()["implementation"] == "python"
        assert "get" not in vars(a)  # the class's methods: pure Python
        for other in (b, c, d):
            assert other.stats()["implementation"] == expected
        assert fast.implementation() == expected
        # One segment, four objects, two implementations: each sees the others' writes.
        a.set("t", {"n": 1}, 60, user_id=3)
        assert a.get("t") == {"n": 1}
        assert b.get("t") is None  # hash-only: another object's session is a miss
        b.set("t", {"n": 1}, 60, user_id=3)  # an equal set: a keeps its copy
        assert a.get("t") == {"n": 1} and b.get("t") == {"n": 1}
        assert c.invalidate_by_user(3) == 1
        assert a.get("t") is None and b.get("t") is None
        assert a.check() == []
    finally:
        for x in (d, c, b, a):
            x.close()


@needs_c
def test_the_cli_says_which_implementation(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=16)
    try:
        env = {**os.environ, fast.ENV: "1"}
        out = subprocess.run(
            [sys.executable, "-m", "shmcache", "stats", segment_name],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout
        assert "implementation" in out and "python" in out
        env[fast.ENV] = "0"
        out = subprocess.run(
            [sys.executable, "-m", "shmcache", "stats", "--json", segment_name],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout
        assert '"implementation": "c"' in out
    finally:
        cache.close()


# -- the same stores -----------------------------------------------------------------------------


class _FixedSeeds:
    """Stands in for ``secrets`` while a segment is created: both segments get one key."""

    def randbits(self, k: int) -> int:
        return 0x2545_F491_4F6C_DD1D & ((1 << k) - 1)


TOKENS = [f"tok-{i}" for i in range(5)] + ["", "\ud800-lone", "é-accented", "x" * 200]
SESSIONS = st.one_of(
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), max_size=3),
    st.text(max_size=90),  # longer than value_size=64 once encoded: oversize
)
USERS = st.one_of(st.none(), st.sampled_from([7, "7", "alice", "bob"]))
OPS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(TOKENS), SESSIONS,
              st.sampled_from([0.001, 0.5, 60, 60.0, 1e16]), USERS),
    st.tuples(st.just("get"), st.sampled_from(TOKENS)),
    st.tuples(st.just("invalidate"), st.sampled_from(TOKENS)),
    st.tuples(st.just("invalidate_by_user"), st.sampled_from([7, "alice", "bob", "nobody"])),
    st.tuples(st.just("advance"), st.sampled_from([0.0004, 0.3, 1.0, 20.0])),
    st.tuples(st.just("clear")),
)
_WORDS = {"W_WRITING": W_WRITING, "W_GEN": W_GEN, "W_CLEARED_AT": W_CLEARED_AT,
          "W_LEASE_DROPS": W_LEASE_DROPS, "W_JOURNAL": W_JOURNAL, "W_EVICTIONS": W_EVICTIONS,
          "W_OVERSIZE": W_OVERSIZE, "W_CLEARS": W_CLEARS}


def _apply(cache: SharedMemorySessionCache, clock: FakeClock, op: tuple[Any, ...]) -> Any:
    kind, *args = op
    if kind == "advance":
        clock.advance(args[0])
        return None
    if kind == "set":
        token, session, ttl, user = args
        try:
            cache.set(token, session, ttl, user_id=user)
        except Exception as exc:
            return type(exc).__name__
        return None
    try:
        return getattr(cache, kind)(*args)
    except Exception as exc:
        return type(exc).__name__


def _figures(cache: SharedMemorySessionCache) -> dict[str, Any]:
    stats = cache.stats()
    return {k: stats[k] for k in ("process_hits", "process_misses", "decode_errors",
                                  "process_lease_drops", "entries", "evictions", "oversize",
                                  "lease_drops", "local_sessions")}


@needs_c
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=50), value_size=st.sampled_from([0, 64, 200]),
       threads=st.booleans())
def test_compiled_core_makes_the_same_stores_as_python(
    ops: list[tuple[Any, ...]], value_size: int, threads: bool
) -> None:
    names = [f"shmcache-test-{os.getpid()}-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    caches: list[SharedMemorySessionCache] = []
    clocks = [FakeClock(1000.0), FakeClock(1000.0)]
    codec = JsonCodec() if value_size else None
    try:
        with mock.patch.object(shm_construct, "secrets", _FixedSeeds()):
            for pure, name, clock in zip((False, True), names, clocks, strict=True):
                # capacity 4: 8 home slots, one window of 8: reclaims and evictions happen
                caches.append(made_as(pure, SharedMemorySessionCache.create, name,
                                      capacity=4, value_size=value_size, clock=clock,
                                      codec=codec))
        c_cache, py_cache = caches
        assert c_cache._fast is not None and py_cache._fast is None
        c_words, py_words = c_cache._words, py_cache._words
        for step, op in enumerate(ops):
            got = [_apply(cache, clock, op) for cache, clock in zip(caches, clocks, strict=True)]
            where = f"step {step}: {op!r}"
            assert got[0] == got[1], where
            assert c_cache._segment.mm[HEADER_SIZE:] == py_cache._segment.mm[HEADER_SIZE:], where
            for label, w in _WORDS.items():
                assert c_words[w] == py_words[w], f"{where}: header word {label}"
            assert _figures(c_cache) == _figures(py_cache), where
        assert c_cache.check() == [] and py_cache.check() == []
    finally:
        for cache in caches:
            cache.close()
        for name in names:
            _unlink(name)


# -- mixed processes under load --------------------------------------------------------------


def _mixed_model_process(pure: bool, *args: Any) -> None:
    os.environ[fast.ENV] = "1" if pure else "0"
    from test_lock import model_process  # tests/shm is on sys.path (pytest's rootdir insert)

    model_process(*args)


@needs_c
def test_mixed_implementations_share_one_segment_under_load(
    segment_name: str, tmp_path: Path
) -> None:
    """Four processes, two compiled and two pure Python, each with 6 cache threads (one
    also with 10 CPU-busy threads), looping set/invalidate/get on 24 shared tokens of a
    value-mode segment while the parent SIGSTOPs a random one 20 times; then the logout
    model (test_lock.check_model) over every process's log, and no recovery, clean check."""
    from test_lock import check_model

    cache = SharedMemorySessionCache.create(segment_name, capacity=256, value_size=96)
    stop = FORK.RawValue("i", 0)
    rng = random.Random(20261215)
    outs = [str(tmp_path / f"log-{i}.pickle") for i in range(4)]
    procs = [
        FORK.Process(
            target=_mixed_model_process,
            args=(i % 2 == 1, cache.name, i, 6, 10 if i == 0 else 0, stop, outs[i]),
            daemon=True,
        )
        for i in range(4)
    ]
    try:
        for p in procs:
            p.start()
        for _ in range(20):
            victim = rng.choice(procs)
            os.kill(victim.pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.05, 0.4))
            os.kill(victim.pid, signal.SIGCONT)
            time.sleep(rng.uniform(0.0, 0.05))
        stop.value = 1
        for p in procs:
            p.join(TIMEOUT)
            assert p.exitcode == 0, f"worker {p.pid} ended with {p.exitcode}"
        logs = [pickle.loads(Path(out).read_bytes()) for out in outs]
        events = [e for log in logs for e in log]
        # Sessions crossed implementations: gets in pure processes returned sessions set
        # by compiled ones, and the other way round.
        setter = {e[2]: i % 2 for i, log in enumerate(logs) for e in log if e[0] == "S"}
        crossed = {(i % 2, setter[e[2]]) for i, log in enumerate(logs) for e in log
                   if e[0] == "G" and e[2] is not None and setter[e[2]] != i % 2}
        assert crossed == {(0, 1), (1, 0)}, crossed
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


def _die_mid_set(name: str, pure: bool, kill_at: int) -> None:
    cache = made_as(pure, SharedMemorySessionCache.attach, name)
    _workers.kill_at_store(cache, kill_at)  # and never release
    cache.set("tok-victim", {"token": "tok-victim", "v": 2}, 60.0)
    os.kill(os.getpid(), signal.SIGKILL)  # the set completed: die holding the lock


@needs_c
@pytest.mark.parametrize("kill_at", [0, 3, 99])
@pytest.mark.parametrize(("dies", "recovers"), [(False, True), (True, False)],
                         ids=["c-dies-python-recovers", "python-dies-c-recovers"])
def test_a_holder_of_either_implementation_is_recovered_by_the_other(
    segment_name: str, dies: bool, recovers: bool, kill_at: int
) -> None:
    creator = made_as(recovers, SharedMemorySessionCache.create, segment_name, capacity=64,
                      value_size=128)
    try:
        creator.set("tok-victim", {"token": "tok-victim", "v": 1}, 60.0)
        creator.set("tok-other", {"token": "tok-other"}, 60.0)
        p = FORK.Process(target=_die_mid_set, args=(segment_name, dies, kill_at), daemon=True)
        p.start()
        p.join(TIMEOUT)
        assert p.exitcode == -signal.SIGKILL
        assert creator.stats()["lock_abandoned"]
        got = creator.get("tok-victim")
        assert got is None or got["token"] == "tok-victim"
        _workers.within(lambda: creator.set("tok-trigger", {"token": "t"}, 60.0))
        stats = creator.stats()
        assert stats["lock_recoveries"] == 1 and stats["implementation"] == (
            "python" if recovers else "c"
        )
        assert creator.check() == []
        assert creator.get("tok-victim") in (None, {"token": "tok-victim", "v": 1},
                                             {"token": "tok-victim", "v": 2})
    finally:
        creator.close()


# -- no compiler -----------------------------------------------------------------------------


@pytest.fixture
def source_copy(tmp_path: Path) -> Iterator[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    dest = tmp_path / "src"
    for f in files:
        if f.startswith(("shmcache/", "setup.py", "pyproject.toml", "README.md")):
            target = dest / f
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, target)
    yield dest


def test_without_a_compiler_the_build_says_so_and_pure_python_runs(
    source_copy: Path, segment_name: str
) -> None:
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    env.pop(fast.ENV, None)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=source_copy, capture_output=True, text=True, env=env, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    said = build.stdout + build.stderr
    assert "shmcache.shm._fast" in said and "failed" in said, said
    assert not list(source_copy.glob("shmcache/shm/_fast*.so"))
    probe = (
        "import sys; from shmcache import SharedMemorySessionCache as C; from shmcache.shm "
        "import fast; c = C.create(sys.argv[1], capacity=16); c.set('t', 1, 60); "
        "print(c.stats()['implementation'], c.get('t'), bool(fast.UNAVAILABLE)); "
        "c.close(); c.unlink()"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, segment_name], cwd=source_copy, capture_output=True,
        text=True, env={**env, "PYTHONPATH": str(source_copy)}, timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["python", "1", "True"]
