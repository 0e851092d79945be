"""Leases through TieredSessionCache (issue 11): they hold end to end. The contract suite
runs the lease rules on ``shm+redis``; here are the two tiers' own paths: a set the remote
drops also drops this host's copy, a copy read from Redis while a logout's message lands
is not kept, and a miss that could not even hash the token (Redis down) is a void lease.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import _redis_support
from _redis_support import eventually, tiered

from shmcache import RedisSessionCache, SharedMemorySessionCache, TieredSessionCache


def _worker(url: str, segment: str, clock: Any, prefix: str) -> TieredSessionCache:
    """Another worker of the same host: the host's segment, attached, and its own client."""
    return TieredSessionCache(
        SharedMemorySessionCache.attach(segment, clock=clock),
        RedisSessionCache(url, prefix=prefix, clock=clock),
        max_staleness=600,
        subscribe=False,
        clock=clock,
    )


def test_a_dropped_set_drops_the_host_s_copy(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """Worker 1 misses and validates; the user logs out on host B and logs in again in
    worker 2 (a fresh set, kept in the host's table). Worker 1's late set is dropped by
    Redis, and worker 1 drops the host's copy at once: worker 2 does not serve it, though
    no invalidation message was applied (none is polled here)."""
    segment = make_name()
    url = redis_server.url
    with (
        tiered(url, segment, clock, prefix=redis_prefix, staleness=600) as worker1,
        _worker(url, segment, clock, redis_prefix) as worker2,
        tiered(url, make_name(), clock, prefix=redis_prefix, staleness=600) as host_b,
    ):
        assert worker1.get("tok") is None
        host_b.invalidate("tok")
        worker2.set("tok", "fresh login", 60)
        assert worker2.get("tok") == "fresh login"
        worker1.set("tok", "late validation", 60)
        assert worker2.get("tok") is None
        assert worker1.get("tok") is None
        assert host_b.get("tok") is None
        assert worker1.stats()["lease_drops"] == 1
        assert worker1.stats()["remote"]["lease_drops"] == 1


def test_a_copy_read_while_the_logout_lands_is_not_kept(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """A local miss, a remote hit: the session is read from Redis, and before it is copied
    into the host's table a logout's message is applied. The copy is not stored (the local
    tier's lease on the key hash, taken at the local miss), so the host does not serve the
    logged-out session for S (here 600 s)."""
    url = redis_server.url
    with (
        tiered(url, make_name(), clock, prefix=redis_prefix, staleness=600) as a,
        tiered(url, make_name(), clock, prefix=redis_prefix, staleness=600) as b,
    ):
        assert b.poll() == 0  # subscribes
        a.set("tok", "s", 60)
        remote = b.remote
        real_lookup = remote.lookup

        def lookup_then_logout(token: str) -> Any:
            found = real_lookup(token)
            a.invalidate(token)  # the logout lands while b is between read and copy
            eventually(lambda: b.poll(0.05) > 0, "the invalidation message")
            return found

        remote.lookup = lookup_then_logout  # type: ignore[method-assign]
        assert b.get("tok") == "s"  # this request read it before the logout: it may use it
        remote.lookup = real_lookup  # type: ignore[method-assign]
        assert b.get("tok") is None  # but the host did not keep it


def test_a_miss_that_could_not_hash_the_token_is_a_void_lease(
    own_redis: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    """Shared-secret mode, Redis down from the start: the get cannot even compute the
    token's key hash (the secret lives in Redis) and, with fail_open, is a miss. The set
    after it, once Redis is back, is not stored: nothing was known of the logouts then."""
    own_redis.stop()
    with tiered(
        own_redis.url, make_name(), clock, prefix=redis_prefix, fail_open=True, timeout=0.5
    ) as cache:
        assert cache.get("tok") is None
        own_redis.start()
        with RedisSessionCache(own_redis.url, prefix=redis_prefix) as elsewhere:
            elsewhere.invalidate("tok")
            cache.set("tok", "s", 60)
            assert cache.get("tok") is None
            assert elsewhere.get("tok") is None
            assert cache.stats()["lease_drops"] == 1
            cache.set("tok", "s", 60)  # the working miss just now: a real lease
            assert elsewhere.get("tok") == "s"
