"""``invalidate_by_user`` racing ``set`` in two real processes (issue 6).

Process A sets sessions in a loop, three of four for user U and one for user V; process B
revokes U again and again while A goes on. Both stamp every call with
``time.monotonic_ns()`` before and after it (one clock for every process on the host), and
A answers B's "may I?" only between two of its sets, so the revocations land in the middle
of A's loop without any sleep. After B is done, A reads back every token it set, and:

* a session of U whose ``set`` returned before some revocation *began* must be gone: that
  is what "once invalidate_by_user returns, no session of the user set before it is left"
  means when the two calls run at once (a ``set`` that overlaps a revocation may land on
  either side of it, as with any concurrent pair of calls);
* a session of U set after the last revocation returned, and every session of V, is there;
* then, with A quiet, one more revocation in B drops every session of U that A can still
  read, and returns how many: a ``set`` that raced a revocation must never end up where no
  later revocation finds it (a session the index lost).

The seed's ``InMemorySessionCache`` runs the same steps and must fail them: each process
revokes only its own copy. The other backends must pass them.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import _redis_support
import _redis_topologies
import pytest

from shmcache import (
    InMemorySessionCache,
    RedisSessionCache,
    SharedMemorySessionCache,
    TieredSessionCache,
)

U, V = "user-u", 7
ROUNDS = 40  # bursts of revocations during the race
BURST = 4  # back-to-back revocations per round, while A goes on setting
BETWEEN = 12  # sets A makes before it lets B revoke again
MAX_SETS = 3000  # A's tokens (all distinct): fits the table without eviction
TIMEOUT = 60.0  # only turns a hang into a failure; nothing waits for it
CTX = multiprocessing.get_context("fork")

Opener = Callable[[], Any]


def writer(open_cache: Opener, peer: Connection, ctl: Connection) -> None:
    """Process A: set tokens until told to stop, letting B revoke between two sets."""
    try:
        cache = open_cache()
        log: list[tuple[str, Any, int, int]] = []  # token, user, set began, set returned
        since_go = 0
        while not ctl.poll():
            if peer.poll() and (since_go >= BETWEEN or len(log) >= MAX_SETS):
                peer.recv()
                peer.send(len(log))
                since_go = 0
            elif len(log) < MAX_SETS:
                token = f"tok-{len(log)}"
                user = V if len(log) % 4 == 3 else U
                began = time.monotonic_ns()
                cache.set(token, (token, user), 600, user_id=user)
                log.append((token, user, began, time.monotonic_ns()))
                since_go += 1
            else:
                wait([peer, ctl], TIMEOUT)  # all set: only answer B, or stop
        ctl.recv()
        ctl.send(log)
        while True:  # "read": report which tokens are still there, until "done"
            if not ctl.poll(TIMEOUT) or ctl.recv() == "done":
                break
            ctl.send({token: cache.get(token) is not None for token, *_ in log})
        close = getattr(cache, "close", None)
        if close is not None:
            close()
    except BaseException:
        ctl.send(("error", traceback.format_exc()))
        raise


def revoker(open_cache: Opener, peer: Connection, ctl: Connection) -> None:
    """Process B: ROUNDS bursts of revocations of U in the middle of A's loop, then one
    more on request."""
    try:
        cache = open_cache()
        rounds: list[tuple[int, int, int]] = []  # began, returned, count
        for _ in range(ROUNDS):
            peer.send("may I?")
            if not peer.poll(TIMEOUT):
                raise AssertionError("A stopped answering")
            peer.recv()
            for _ in range(BURST):
                began = time.monotonic_ns()
                count = cache.invalidate_by_user(U)
                rounds.append((began, time.monotonic_ns(), count))
        ctl.send(rounds)
        if ctl.poll(TIMEOUT) and ctl.recv() == "final":
            ctl.send(cache.invalidate_by_user(U))
        close = getattr(cache, "close", None)
        if close is not None:
            close()
    except BaseException:
        ctl.send(("error", traceback.format_exc()))
        raise


class Outcome:
    """What the race left, as A reads it back."""

    def __init__(
        self,
        log: list[tuple[str, Any, int, int]],
        rounds: list[tuple[int, int, int]],
        present: dict[str, bool],
        final_count: int,
        present_after_final: dict[str, bool],
    ) -> None:
        first_began = min(began for began, _, _ in rounds)
        last_began = max(began for began, _, _ in rounds)
        last_returned = max(returned for _, returned, _ in rounds)
        self.log = log
        self.present = present
        self.final_count = final_count
        # U's sessions that returned before a revocation began: every one must be gone.
        self.must_be_gone = [t for t, u, _, ret in log if u == U and ret < last_began]
        self.survivors = [t for t in self.must_be_gone if present[t]]
        self.before_first = [t for t, u, _, ret in log if u == U and ret < first_began]
        # Set after every revocation was over: must be there.
        self.later = [t for t, u, began, _ in log if u == U and began > last_returned]
        self.v_tokens = [t for t, u, _, _ in log if u == V]
        self.u_present = [t for t, u, _, _ in log if u == U and present[t]]
        self.u_after_final = [t for t, u, _, _ in log if u == U and present_after_final[t]]
        self.v_after_final = [t for t in self.v_tokens if present_after_final[t]]


def race(open_cache: Opener) -> Outcome:
    a_peer, b_peer = CTX.Pipe()
    a_ctl, a_child = CTX.Pipe()
    b_ctl, b_child = CTX.Pipe()
    a = CTX.Process(target=writer, args=(open_cache, a_peer, a_child), daemon=True)
    b = CTX.Process(target=revoker, args=(open_cache, b_peer, b_child), daemon=True)
    a.start()
    b.start()

    def reply(conn: Connection, who: str) -> Any:
        # Either process may report a failure while the other is the one awaited.
        for ready in wait([a_ctl, b_ctl], TIMEOUT):
            if ready is not conn:
                got = ready.recv()
                raise AssertionError(f"process {'A' if ready is a_ctl else 'B'}: {got!r}")
        if not conn.poll():
            raise AssertionError(f"process {who} did not answer")
        got = conn.recv()
        if isinstance(got, tuple) and got and got[0] == "error":
            raise AssertionError(f"process {who} failed:\n{got[1]}")
        return got

    try:
        rounds = reply(b_ctl, "B")  # B is done racing
        a_ctl.send("stop")
        log = reply(a_ctl, "A")
        a_ctl.send("read")
        present = reply(a_ctl, "A")
        b_ctl.send("final")
        final_count = reply(b_ctl, "B")
        a_ctl.send("read")
        present_after_final = reply(a_ctl, "A")
        a_ctl.send("done")
    finally:
        for proc in (a, b):
            proc.join(TIMEOUT)
            if proc.is_alive():
                proc.kill()
                proc.join(TIMEOUT)
    assert (a.exitcode, b.exitcode) == (0, 0)
    return Outcome(log, rounds, present, final_count, present_after_final)


# -- the backends ----------------------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    return _redis_support.shared_server().url  # fails, saying how to install one, without a server


@pytest.fixture(params=[0, 256], ids=["hash", "value"])
def shm_segment(request: pytest.FixtureRequest, segment_name: str) -> Iterator[str]:
    with SharedMemorySessionCache.create(
        segment_name, capacity=8192, value_size=request.param
    ) as creator:
        yield segment_name
        assert creator.check() == []
        assert creator.stats()["evictions"] == 0  # nothing vanished for want of room


def check_revocations_hold(outcome: Outcome, *, exact_final_count: bool = True) -> None:
    assert outcome.before_first, "B revoked before A had set anything: the race is vacuous"
    assert outcome.survivors == [], (
        f"{len(outcome.survivors)} of U's sessions set before a revocation began survived "
        f"it: {outcome.survivors[:5]}"
    )
    assert all(outcome.present[t] for t in outcome.later), "a later login of U was dropped"
    assert all(outcome.present[t] for t in outcome.v_tokens), "V's sessions were touched"
    assert outcome.u_after_final == [], "a session of U escaped every later revocation"
    assert len(outcome.v_after_final) == len(outcome.v_tokens)
    if exact_final_count:
        assert outcome.final_count == len(outcome.u_present)
    else:
        assert outcome.final_count <= len(outcome.u_present)


def test_shared_memory(shm_segment: str) -> None:
    check_revocations_hold(race(lambda: SharedMemorySessionCache.attach(shm_segment)))


def test_redis(redis_url: str, redis_prefix: str) -> None:
    check_revocations_hold(race(lambda: RedisSessionCache(redis_url, prefix=redis_prefix)))


def test_redis_cluster(redis_prefix: str) -> None:
    """The same race on a real three-primary Redis Cluster, exact final count included."""
    url = _redis_topologies.shared_cluster().url()
    check_revocations_hold(race(lambda: RedisSessionCache(url, prefix=redis_prefix)))


def test_shared_memory_in_front_of_redis(
    redis_url: str, redis_prefix: str, segment_name: str
) -> None:
    """One host, two workers, subscribe=False and S = 1 h: only the revoking process's own
    drop from the host's table (and Redis) can make A miss."""
    def open_tiered() -> TieredSessionCache:
        return TieredSessionCache(
            SharedMemorySessionCache.attach(segment_name),
            RedisSessionCache(redis_url, prefix=redis_prefix),
            max_staleness=3600,
            subscribe=False,
        )

    with SharedMemorySessionCache.create(segment_name, capacity=8192, value_size=256):
        # A set that races a revocation can be linearised before it in Redis and still
        # leave its host copy after the host's drop: a copy Redis no longer counts (it dies
        # within S). So the final count is a lower bound here, and the final read (host
        # table, then Redis) must still find nothing of U.
        check_revocations_hold(race(open_tiered), exact_final_count=False)


def test_in_memory_cache_shows_the_bug() -> None:
    """The seed's cache, inherited by both processes as gunicorn's preload does: B's
    revocations reach B's copy only, so A keeps serving every session of U."""
    seed = InMemorySessionCache()
    outcome = race(lambda: seed)
    assert outcome.before_first
    assert outcome.survivors == outcome.must_be_gone  # not one of them was dropped
    assert outcome.final_count == 0  # B's dict never held them
    assert len(outcome.u_after_final) == len(outcome.u_present) > 0
