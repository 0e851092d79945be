"""Top-level functions run in child processes by the process tests (importable under spawn).

Nothing here is a test. Children report through pipes and exit codes only: a child may be
SIGKILLed at any moment, and a multiprocessing Queue or Event whose internal lock dies with
its holder would hang the parent.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from shmcache import SharedMemorySessionCache

TIMEOUT = 30.0  # turns a hang into a failure; no test relies on it being short


class Remote:
    """A child process answering commands over a pipe (``target(*args, conn)``); a child that
    does not answer within ``TIMEOUT`` fails the test instead of hanging it."""

    def __init__(self, ctx: Any, target: Callable[..., None], *args: Any, label: str) -> None:
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(*args, child), daemon=True)
        self.proc.start()
        child.close()

    def __call__(self, cmd: str, *args: Any) -> Any:
        self.conn.send((cmd, *args))
        if not self.conn.poll(TIMEOUT):
            raise AssertionError(
                f"{self.label} {self.proc.pid} did not answer {cmd!r} in {TIMEOUT} s"
            )
        status, result = self.conn.recv()
        if status != "ok":
            raise AssertionError(f"{cmd!r} failed in {self.label} {self.proc.pid}: {result}")
        return result

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self("stop")
        finally:
            self.proc.join(TIMEOUT)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(TIMEOUT)
                raise AssertionError(f"{self.label} {self.proc.pid} did not exit")
        assert self.proc.exitcode == 0, self.proc.exitcode


def within(fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """``fn()``'s result (or its exception), or a failure if it has not returned in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{fn!r} still running after {timeout} s: hung")
    if "error" in box:
        raise box["error"]
    return box.get("result")


# Exit codes a storm writer uses to say what went wrong (SIGKILL shows as -9).
EXIT_WRONG_SESSION = 3
EXIT_ERROR = 4
EXIT_STALE_SESSION = 5


def open_cache(spec: Any) -> Any:
    """``spec`` is a cache object (inherited by fork, or pickled to spawn) or
    ``("attach", name, kwargs)`` to attach by name in the child."""
    if isinstance(spec, tuple) and spec and spec[0] == "attach":
        return SharedMemorySessionCache.attach(spec[1], **spec[2])
    return spec


def serve(spec: Any, conn: Any) -> None:
    """Run cache commands sent over ``conn`` until ``("stop",)``; each reply is sent only
    after the operation returned, so the caller knows it has happened."""
    answer_commands(open_cache(spec), conn)


def answer_commands(cache: Any, conn: Any) -> None:
    """The command loop of ``serve`` (also used by the Redis "hosts")."""
    while True:
        if not conn.poll(60):
            return  # the parent is gone or stuck: do not linger
        cmd, *args = conn.recv()
        if cmd == "stop":
            conn.send(("ok", None))
            return
        try:
            result = getattr(cache, cmd)(*args)
        except Exception as exc:  # reported to the test, which decides
            conn.send(("err", f"{type(exc).__name__}: {exc}"))
        else:
            conn.send(("ok", result))


# -- the same crash points in both implementations -----------------------------------------


class KillOnWrite:
    """Wraps a buffer or a word view: lets item assignments through while the shared budget
    lasts, then SIGKILLs the process at the next one. Wrapping both the table's buffer and
    its words kills the real write code at an exact store, whatever the layout."""

    def __init__(self, target: Any, budget: list[int], torn: int = -1) -> None:
        self._target = target
        self._budget = budget
        self._torn = torn  # with torn >= 0: that store writes only half its bytes, no kill

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._torn >= 0:
            if self._torn == 0 and isinstance(key, slice) and len(value) > 1:
                half = len(value) // 2
                self._target[key.start : key.start + half] = value[:half]
            else:
                self._target[key] = value
            self._torn -= 1
            return
        if self._budget[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)  # not reached
        self._budget[0] -= 1
        self._target[key] = value

    def __getitem__(self, key: Any) -> Any:
        return self._target[key]

    def __len__(self) -> int:
        return len(self._target)

    def find(self, *args: Any) -> int:
        return int(self._target.find(*args))


def kill_at_store(cache: Any, budget: int | None = None, torn: int = -1) -> None:
    """Make this process's next write through ``cache`` die by SIGKILL before its
    ``budget``-th store to the table (journal, tag, slot words, value), or, with ``torn``,
    write only half of its ``torn``-th byte-range store (tag, value) and go on; and never
    release the lock (the holder dies holding it). In both implementations: the pure-Python
    table's buffer and words are wrapped, and the compiled core (whose writes bypass them)
    counts the same stores in the same order."""
    shared = [10**9 if budget is None else budget]
    table = cache._table
    if torn >= 0:
        table._buf = KillOnWrite(table._buf, shared, torn=torn)
    else:
        table._buf = KillOnWrite(table._buf, shared)
        table.words = KillOnWrite(table.words, shared)
        if table.arena is not None:  # the allocator's stores count too
            table.arena.words = table.words
    cache._lock.release = lambda: None  # die holding it
    if cache._fast is not None:
        cache._fast.test_hooks(budget=-1 if budget is None else budget, torn=torn, hold=True)


def on_lock_wait(cache: Any, hook: Callable[[], None]) -> None:
    """Call ``hook`` each time a write of ``cache`` starts a timed wait for the lock (the
    pure-Python lock's ``lock_until``, or the compiled core's wait slices)."""
    mutex = cache._lock._mutex
    original = mutex.lock_until

    def instrumented(deadline: float) -> int:
        hook()
        return int(original(deadline))

    mutex.lock_until = instrumented
    if cache._fast is not None:
        cache._fast.test_hooks(wait_hook=hook)


# -- the multi-process stress run -----------------------------------------------------------


def stress_worker(
    spec: Any,
    wid: int,
    seed: int,
    n_ops: int,
    shared: list[str],
    value_mode: bool,
    go: Any,
    conn: Any,
) -> None:
    """Random set/get/invalidate on shared and private tokens with a real clock.

    Checks, on its private tokens (no other process touches them, and the table is sized so
    nothing is evicted): a get after its own set returns that session unless the TTL has
    run out, and a get after its own invalidate returns None. On shared tokens: a get never
    returns another token's session (value mode), or anything but our own latest session
    (hash mode). Sends back (errors, the last op on each shared token, private tokens used).
    """
    errors: list[str] = []
    last_shared: dict[str, Any] = {}
    private = [f"private-{wid}-{i}-{seed}" for i in range(80)]
    try:
        cache = open_cache(spec)
        rng = random.Random(seed)
        expected: dict[str, tuple[Any, float] | None] = {}
        if not go.wait(60):
            raise RuntimeError("never got the go signal")
        clock = time.monotonic
        for n in range(n_ops):
            r = rng.random()
            if r < 0.25:
                t = rng.choice(shared)
                s = {"token": t, "w": wid, "n": n}
                cache.set(t, s, rng.choice([0.02, 0.2, 60.0]))
                last_shared[t] = s
            elif r < 0.33:
                t = rng.choice(shared)
                cache.invalidate(t)
                last_shared[t] = None
                # Our own invalidate returned: our sessions are gone. Another process may
                # have set the token since (then value mode may return its session).
                v = cache.get(t)
                if v is not None and (not value_mode or v.get("w") == wid or v["token"] != t):
                    errors.append(f"op {n}: shared {t} -> {v!r} right after our invalidate")
            elif r < 0.48:
                t = rng.choice(shared)
                v = cache.get(t)
                if v is not None:
                    if value_mode and (not isinstance(v, dict) or v.get("token") != t):
                        errors.append(f"op {n}: get({t!r}) returned another session {v!r}")
                    if not value_mode and v != last_shared.get(t):
                        errors.append(f"op {n}: hash-mode get({t!r}) -> {v!r}, not ours")
            elif r < 0.70:
                t = rng.choice(private)
                s = {"token": t, "w": wid, "n": n}
                ttl = rng.choice([0.01, 0.05, 60.0, 60.0, 60.0])
                t0 = clock()
                drops = cache.stats().get("process_lease_drops", 0)
                cache.set(t, s, ttl)
                if cache.stats().get("process_lease_drops", 0) != drops:
                    # A logout raced our earlier miss of t (a clear elsewhere, or a bucket
                    # shared with another token's logout), or the miss is older than the
                    # lease timeout: not stored, and t is a miss (issue 11's leases).
                    expected[t] = None
                    continue
                expected[t] = (s, t0 + ttl)
                v = cache.get(t)
                if v != s and clock() < t0 + ttl - 0.002:
                    errors.append(f"op {n}: get right after set({t!r}) -> {v!r}, want {s!r}")
            elif r < 0.80:
                t = rng.choice(private)
                cache.invalidate(t)
                expected[t] = None
                v = cache.get(t)
                if v is not None:
                    errors.append(f"op {n}: get right after invalidate({t!r}) -> {v!r}")
            else:
                t = rng.choice(private)
                v = cache.get(t)
                now = clock()
                e = expected.get(t)
                if e is None:
                    if v is not None:
                        errors.append(f"op {n}: private {t!r} never set/invalidated -> {v!r}")
                elif v is None:
                    if now < e[1] - 0.002:
                        errors.append(f"op {n}: private {t!r} lost before its expiry")
                elif v != e[0]:
                    errors.append(f"op {n}: private {t!r} -> {v!r}, latest set was {e[0]!r}")
            if len(errors) > 20:
                break
    except BaseException:
        errors.append(traceback.format_exc())
    conn.send((errors, last_shared, private))
    conn.close()


# -- the kill storm -------------------------------------------------------------------------

STORM_TOKENS = [f"storm-{i}" for i in range(96)]


def _storm_op(cache: Any, rng: random.Random, hold: float) -> None:
    t = rng.choice(STORM_TOKENS)
    r = rng.random()
    if r < hold:
        # Sit in the critical section for a moment so that kills land inside it; some
        # holds outlast a waiter's wait slice, so waiters see a live owner and must wait.
        cache._lock.acquire()
        try:
            time.sleep(rng.choice((0.003, 0.003, 0.04)))
        finally:
            cache._lock.release()
    elif r < 0.55:
        cache.set(t, {"token": t, "pid": os.getpid()}, rng.choice([0.05, 2.0, 60.0]))
    elif r < 0.80:
        cache.invalidate(t)
        v = cache.get(t)  # another writer may have set it since, but not we
        if v is not None and (v.get("token") != t or v.get("pid") == os.getpid()):
            os._exit(EXIT_STALE_SESSION)
    elif r < 0.801:
        cache.clear()
    elif r < 0.806:
        cache.purge()
    else:
        v = cache.get(t)
        if v is not None and (not isinstance(v, dict) or v.get("token") != t):
            os._exit(EXIT_WRONG_SESSION)


def storm_writer(cache: Any, seed: int, hold: float, stop: Any, progress: Any, idx: int) -> None:
    """Write until ``stop.value`` is set, then do a last batch and exit 0. ``progress[idx]``
    counts operations (a lock-free shared array: safe to be killed while touching it)."""
    try:
        rng = random.Random(seed)
        while not stop.value:
            _storm_op(cache, rng, hold)
            progress[idx] += 1
        for _ in range(300):  # the remaining work, after the storm
            _storm_op(cache, rng, 0.0)
            progress[idx] += 1
    except BaseException:
        traceback.print_exc()
        os._exit(EXIT_ERROR)


def die_holding_lock(cache: Any, seed: int) -> None:
    """Take the lock, maybe start writing a slot, then SIGKILL ourselves (a kill that
    certainly lands inside the critical section)."""
    from shmcache.shm.layout import OP_SLOT, W_JOURNAL

    cache._lock.acquire()
    rng = random.Random(seed)
    if rng.random() < 0.5:
        table = cache._table
        slot = rng.randrange(table.geometry.physical_slots)
        words = table.words
        words[W_JOURNAL] = (OP_SLOT << 56) | slot
        cw = table.check_word_index(slot)
        words[cw] = 0
        t = table.geometry.tags_offset + 16 * slot
        cache._segment.mm[t : t + 8] = rng.randbytes(8)  # half a tag, no check
    os.kill(os.getpid(), signal.SIGKILL)
