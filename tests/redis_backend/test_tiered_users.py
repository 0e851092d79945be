"""``invalidate_by_user`` on ``TieredSessionCache`` (issue 6): a revocation reaches the
other hosts' tables by pub/sub, and within the same bound S without messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _redis_support
import pytest
from _redis_support import TIMEOUT, Host, eventually, tiered, within

from shmcache import (
    CacheUnavailable,
    InMemorySessionCache,
    RedisSessionCache,
    SharedMemorySessionCache,
    TieredSessionCache,
)

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
