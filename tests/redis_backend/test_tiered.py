"""TieredSessionCache (the host's shared-memory table in front of Redis) on a real
redis-server: logouts reaching other hosts by pub/sub, in separate processes and across a
fork, and the staleness bound that holds when messages are lost, driven by an injected clock.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import _redis_support
import _workers
import pytest
from _redis_support import (
    TIMEOUT,
    Host,
    eventually,
    tiered,
    within,
)

from shmcache import (
    CacheUnavailable,
    InMemorySessionCache,
    InvalidArgument,
    RedisSessionCache,
    SharedMemorySessionCache,
    TieredSessionCache,
)


def test_two_hosts_tiered(
    redis_server: _redis_support.RedisServer, redis_prefix: str, make_name: Callable[[], str]
) -> None:
    """With S = 600 s, only the pub/sub message can make host B drop its local copy."""
    base = f"shm+redis://127.0.0.1:{redis_server.port}/0?prefix={redis_prefix}&capacity=1024&value_size=256"
    host_a = f"{base}&shm={make_name()}&max_staleness=600"
    host_b = f"{base}&shm={make_name()}&max_staleness=600"
    a, b1, b2 = Host(host_a), Host(host_b), Host(host_b)  # b1 and b2: one host, two workers
    try:
        # Made before anyone listens: the announcement of a new secret empties every
        # host's table, and would race with the copies below.
        assert a("get", "warm-up") is None
        for host in (a, b1, b2):
            assert host("wait_subscribed", TIMEOUT) is True
        a("set", "tok", {"user": "alice"}, 60)
        assert b1("get", "tok") == {"user": "alice"}  # from Redis, now in B's table
        assert b2("get", "tok") == {"user": "alice"}  # from B's table
        assert b2("stats")["local_hits"] == 1
        a("invalidate", "tok")
        assert a("get", "tok") is None
        eventually(lambda: b1("get", "tok") is None, "the logout on host B (worker 1)")
        eventually(lambda: b2("get", "tok") is None, "the logout on host B (worker 2)")
        b1("set", "t2", "x", 60)
        assert a("get", "t2") == "x"
        b2("clear")
        eventually(lambda: a("get", "t2") is None, "the clear on host A")
    finally:
        for host in (a, b1, b2):
            host.stop()


def test_fork_restarts_the_subscriber(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """gunicorn's preload: the master makes the cache (and may use it), workers are forked.
    A forked worker runs its own subscriber: the master's thread did not survive the fork."""
    host_b = tiered(
        redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600, subscribe=True
    )
    assert host_b.wait_subscribed(TIMEOUT)
    ctx = multiprocessing.get_context("fork")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_workers.serve, args=(host_b, child), daemon=True)
    proc.start()
    child.close()

    def worker(cmd: str, *args: Any) -> Any:
        conn.send((cmd, *args))
        assert conn.poll(TIMEOUT), f"forked worker did not answer {cmd!r}"
        status, result = conn.recv()
        assert status == "ok", result
        return result

    try:
        host_b.close()  # the master's subscriber is gone: only the worker's can act
        assert worker("wait_subscribed", TIMEOUT) is True
        with tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as host_a:
            host_a.set("tok", "s", 60)
            assert worker("get", "tok") == "s"
            host_a.invalidate("tok")
        eventually(lambda: worker("get", "tok") is None, "the logout in the forked worker")
        worker("stop")
    finally:
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


# -- the two-tier staleness bound, on an injected clock -------------------------------------


def test_staleness_bound_without_messages(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """No subscriber at all (pub/sub lost): B's local copy is trusted for S, not longer."""
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s", 60)
        t0 = clock.now
        assert b.get("tok") == "s"  # read from Redis at t0, copied to B's table
        a.invalidate("tok")
        clock.now = t0 + 4.999
        assert b.get("tok") == "s"  # the stale copy: what S allows, and no more
        clock.now = t0 + 5.0
        assert b.get("tok") is None  # S is up: B asks Redis again
        assert b.stats()["remote_hits"] == 1


def test_staleness_counted_from_before_the_read(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """A read that took 3 s (the logout landed meanwhile) keeps its copy for S - 3 s."""
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s", 60)
        remote = b._remote
        real_lookup = remote.lookup

        def slow_lookup(token: str) -> Any:
            found = real_lookup(token)
            clock.advance(3.0)
            return found

        remote.lookup = slow_lookup  # type: ignore[method-assign]
        t0 = clock.now
        assert b.get("tok") == "s"
        remote.lookup = real_lookup  # type: ignore[method-assign]
        a.invalidate("tok")
        clock.now = t0 + 4.999
        assert b.get("tok") == "s"
        clock.now = t0 + 5.0
        assert b.get("tok") is None


def test_ttl_shorter_than_staleness(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s", 2)
        clock.advance(0.5)
        assert b.get("tok") == "s"  # 1.5 s left in Redis: B keeps it 1.5 s, not S
        clock.advance(1.499)
        assert b.get("tok") == "s"
        clock.advance(0.001)
        assert b.get("tok") is None


def test_poll_applies_invalidations(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as b,
    ):
        assert b.poll() == 0  # subscribes
        a.set("tok", "s", 60)
        a.set("other", "o", 60)
        assert b.get("tok") == "s"
        assert b.get("other") == "o"
        a.invalidate("tok")
        assert b.get("tok") == "s"  # not polled yet: S is all that bounds it
        eventually(lambda: b.poll(0.05) > 0 and b.get("tok") is None, "the invalidation")
        assert b.get("other") == "o"
        a.clear()
        eventually(lambda: b.poll(0.05) > 0 and b.get("other") is None, "the clear")
        with pytest.raises(InvalidArgument):
            tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, subscribe=True).poll()


def test_new_secret_drops_local_copies(
    redis_server: _redis_support.RedisServer,
    redis_raw: Any,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as b,
    ):
        b.poll()
        a.set("tok", "s", 60)
        assert b.get("tok") == "s"
        tag = "{" + redis_prefix + "}"
        redis_raw.delete(tag + "secret", tag + "fingerprint")  # what a FLUSHDB does
        a.set("tok", "s2", 60)  # a makes the next secret and announces it
        eventually(lambda: b.poll(0.05) > 0 and b.get("tok") == "s2", "the new secret")


def test_tiered_redis_stopped(
    own_redis: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """Redis lost: local copies serve for at most S, then a miss (fail-open) or an error;
    a logout or a clear raises, and still drops this host's copies."""
    url = own_redis.url
    with (
        tiered(
            url, make_name(), clock, prefix=redis_prefix, fail_open=True, timeout=0.5
        ) as lenient,
        tiered(url, make_name(), clock, prefix=redis_prefix, timeout=0.5) as strict,
    ):
        for cache in (lenient, strict):
            cache.set("tok", "s", 60)
            cache.set("tok2", "s2", 60)
        t0 = clock.now
        own_redis.stop()
        clock.now = t0 + 4.999
        assert within(lambda: lenient.get("tok")) == "s"
        assert within(lambda: strict.get("tok")) == "s"
        with pytest.raises(CacheUnavailable):
            within(lambda: lenient.invalidate("tok2"))
        assert within(lambda: lenient.get("tok2")) is None  # the local copy went anyway
        with pytest.raises(CacheUnavailable):
            within(strict.clear)
        with pytest.raises(CacheUnavailable):
            within(lambda: strict.get("tok2"))  # no local copy left: asks the dead Redis
        clock.now = t0 + 5.0
        assert within(lambda: lenient.get("tok")) is None
        within(lambda: lenient.set("new", "n", 60))  # counted, stored nowhere
        assert within(lambda: lenient.get("new")) is None
        assert lenient.stats()["remote"]["unavailable"] >= 4


def test_resubscribe_drops_local_copies(
    own_redis: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """Messages sent while a subscriber was disconnected are lost: when it is back, it
    drops everything its host copied before."""
    with tiered(
        own_redis.url,
        make_name(),
        clock,
        prefix=redis_prefix,
        staleness=600,
        subscribe=True,
        timeout=0.5,
    ) as b:
        assert b.wait_subscribed(TIMEOUT)
        b.set("tok", "s", 60)
        local = b._local
        key = b._remote.key_of("tok")
        assert local.get(key) == "s"
        own_redis.stop()
        own_redis.start()
        eventually(lambda: b.stats()["resubscribes"] >= 2, "the resubscription")
        assert local.get(key) is None


# -- users: invalidate_by_user across hosts, within the same bound S (issue 6) --------------


def test_revoked_user_reaches_other_hosts(
    redis_server: _redis_support.RedisServer, redis_prefix: str, make_name: Callable[[], str]
) -> None:
    """Hosts in their own processes, opened by URL with ``user_id_of``; S = 600 s, so only
    the ``u:`` message can make host B drop the copies it read from Redis."""
    base = (
        f"shm+redis://127.0.0.1:{redis_server.port}/0?prefix={redis_prefix}"
        "&capacity=1024&value_size=256&max_staleness=600"
    )
    user_of = _redis_support.session_user
    a = Host(f"{base}&shm={make_name()}", user_id_of=user_of)
    host_b = f"{base}&shm={make_name()}"
    b1, b2 = Host(host_b, user_id_of=user_of), Host(host_b, user_id_of=user_of)
    try:
        assert a("get", "warm-up") is None  # the secret exists before anyone copies
        for host in (a, b1, b2):
            assert host("wait_subscribed", TIMEOUT) is True
        a("set", "phone", {"user": "alice", "d": 1}, 60)
        a("set", "laptop", {"user": "alice", "d": 2}, 60)
        a("set", "bob", {"user": "bob"}, 60)
        for token in ("phone", "laptop", "bob"):
            assert b1("get", token) is not None  # from Redis, now in B's table
        assert b2("get", "phone") == {"user": "alice", "d": 1}
        assert b2("stats")["local_hits"] == 1  # B's copy, filed under alice's hash
        assert a("invalidate_by_user", "alice") == 2
        assert a("get", "phone") is None
        eventually(
            lambda: b1("get", "phone") is None and b2("get", "laptop") is None,
            "the revocation on host B",
        )
        assert b2("get", "bob") == {"user": "bob"}
    finally:
        for host in (a, b1, b2):
            host.stop()


def test_revocation_bound_without_messages(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """No subscriber: B's copy of a revoked user's session is trusted for S, not longer."""
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s", 60, user_id=9)
        t0 = clock.now
        assert b.get("tok") == "s"
        assert a.invalidate_by_user("9") == 1
        assert a.get("tok") is None  # the revoking host: at once
        clock.now = t0 + 4.999
        assert b.get("tok") == "s"  # what S allows, and no more
        clock.now = t0 + 5.0
        assert b.get("tok") is None


def test_poll_applies_revocations(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    with (
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as a,
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix, staleness=600) as b,
    ):
        assert b.poll() == 0  # subscribes
        a.set("u1", "s1", 60, user_id="u")
        b.set("u2", "s2", 60, user_id="u")  # B's own copy, filed by B
        a.set("v1", "v", 60, user_id="v")
        a.set("anon", "n", 60)
        for token in ("u1", "u2", "v1", "anon"):
            assert b.get(token) is not None
        assert a.invalidate_by_user("u") == 2
        assert b.get("u1") == "s1"  # not polled yet: S is all that bounds it
        eventually(
            lambda: b.poll(0.05) > 0 and b.get("u1") is None and b.get("u2") is None,
            "the revocation",
        )
        assert (b.get("v1"), b.get("anon")) == ("v", "n")
        b.apply(b"u:not-a-hash")  # not ours to act on: ignored
        b.apply(b"u:")
        assert (b.get("v1"), b.get("anon")) == ("v", "n")


class _SeedLocal:
    """A local tier with only the seed's four methods (no users)."""

    def __init__(self, clock: Any) -> None:
        self._cache = InMemorySessionCache(clock=clock)

    def get(self, token: str) -> Any:
        return self._cache.get(token)

    def set(self, token: str, session: Any, ttl_seconds: float) -> None:
        self._cache.set(token, session, ttl_seconds)

    def invalidate(self, token: str) -> None:
        self._cache.invalidate(token)

    def clear(self) -> None:
        self._cache.clear()


def test_local_tier_without_users_is_emptied(
    redis_server: _redis_support.RedisServer, redis_prefix: str, clock: Any
) -> None:
    with TieredSessionCache(
        _SeedLocal(clock),
        RedisSessionCache(redis_server.url, prefix=redis_prefix, clock=clock),
        max_staleness=600,
        subscribe=False,
        clock=clock,
    ) as cache:
        cache.set("u1", "s", 60, user_id="u")
        cache.set("other", "o", 60)
        assert cache.get("other") == "o"
        assert cache.stats()["local_hits"] == 1
        assert cache.invalidate_by_user("u") == 1
        assert cache.get("u1") is None
        assert cache.get("other") == "o"  # from Redis again: the local tier was emptied
        assert cache.stats()["remote_hits"] == 1


def test_tiered_revocation_with_redis_stopped(
    own_redis: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """Redis lost: a revocation raises, and still drops this host's copies of the user."""
    with tiered(
        own_redis.url, make_name(), clock, prefix=redis_prefix, fail_open=True, timeout=0.5
    ) as cache:
        cache.set("u1", "s", 60, user_id="u")
        cache.set("v1", "v", 60, user_id="v")
        own_redis.stop()
        with pytest.raises(CacheUnavailable):
            within(lambda: cache.invalidate_by_user("u"))
        assert within(lambda: cache.get("u1")) is None  # local copy gone; Redis: a miss
        assert within(lambda: cache.get("v1")) == "v"  # another user's copy stays


def test_user_id_of_given_to_the_remote_only(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """A tiered cache built by hand with ``user_id_of`` on its Redis tier still files
    sessions by user (the tiered cache's own ``user_id_of`` comes first)."""
    with TieredSessionCache(
        SharedMemorySessionCache.create(make_name(), capacity=64, value_size=256, clock=clock),
        RedisSessionCache(
            redis_server.url, prefix=redis_prefix, clock=clock, user_id_of=lambda s: s["uid"]
        ),
        subscribe=False,
        clock=clock,
    ) as cache:
        cache.set("a", {"uid": 1}, 60)
        cache.set("b", {"uid": 2}, 60)
        assert cache.invalidate_by_user(1) == 1
        assert cache.get("a") is None
        assert cache.get("b") == {"uid": 2}
