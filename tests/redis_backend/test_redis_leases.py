"""Leases on Redis (issue 11): what only the Redis backend has. The contract suite
(tests/test_contract.py) holds every backend to the lease rules; here are the logout marks
in Redis, what they cost, and the keys that can go missing (an expiry, a lost clock, a
FLUSHDB, an outage) without letting a racing set through.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from _clock import FakeClock
from _redis_support import TIMEOUT

from shmcache import InvalidArgument, RedisSessionCache, TieredSessionCache, open_cache
from shmcache.redis import scripts

SECRET = b"test-secret-of-at-least-16-bytes"


def tag(prefix: str) -> str:
    return "{" + prefix + "}"


def _evalsha_calls(raw: Any) -> int:
    stats = raw.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_logout_marks_live_for_the_longest_lease(
    redis_server: Any, redis_raw: Any, redis_prefix: str
) -> None:
    """Each logout leaves one small key, kept lease_timeout + 1 s: the longest lease_timeout
    of the clients that missed lately (the horizon), even if the logout's own is shorter."""
    url = redis_server.url
    with (
        RedisSessionCache(url, prefix=redis_prefix, lease_timeout=60) as short,
        RedisSessionCache(url, prefix=redis_prefix, lease_timeout=600) as long,
    ):
        short.set("tok", "s", 60, user_id="alice")
        short.invalidate("tok")
        short.invalidate_by_user("alice")
        short.clear()
        marks = [k for k in redis_raw.scan_iter(match=tag(redis_prefix) + "l[su]:*")]
        marks.append((tag(redis_prefix) + "cleared").encode())
        assert len(marks) == 3
        for key in marks:
            # (lower bounds with seconds to spare: the machine may be busy)
            assert 50_000 < redis_raw.pttl(key) <= 60_000 + scripts.GRACE_MS
            assert redis_raw.memory_usage(key) <= 128  # bytes, for the README's figure
        assert short.get("nobody") is None  # a miss: the horizon is 60 s
        assert long.get("nobody") is None  # ... now 600 s, for 601 s
        assert 590_000 < redis_raw.pttl(tag(redis_prefix) + "horizon") <= 601_000
        short.invalidate("tok")  # so a short client's logout is kept for the long lease
        (mark,) = redis_raw.scan_iter(match=tag(redis_prefix) + "ls:*")
        assert 590_000 < redis_raw.pttl(mark) <= 601_000


def test_a_hit_costs_one_call_and_writes_nothing(
    own_redis: Any, redis_prefix: str
) -> None:
    """The lease rides on the calls a cache makes anyway: a hit, a miss (which carries its
    lease back) and a set are one script call each, and a hit writes no lease key."""
    import redis

    raw = redis.Redis(host="127.0.0.1", port=own_redis.port, socket_timeout=TIMEOUT)
    with RedisSessionCache(own_redis.url, prefix=redis_prefix, secret=SECRET) as cache:
        cache.set("tok", "s", 60)
        before = _evalsha_calls(raw)
        assert cache.get("tok") == "s"
        assert _evalsha_calls(raw) == before + 1
        assert not raw.exists(tag(redis_prefix) + "horizon")  # no lease: nothing written
        assert cache.get("other") is None
        assert _evalsha_calls(raw) == before + 2
        assert raw.exists(tag(redis_prefix) + "horizon")
        cache.set("other", "o", 60)
        assert _evalsha_calls(raw) == before + 3
        assert cache.get("other") == "o"
    raw.close()


def test_lease_expires_on_the_server_clock_too(redis_server: Any, redis_prefix: str) -> None:
    """A client whose clock stands still (a stalled or suspended process) still cannot use
    a lease older than lease_timeout: the set script checks its age on the server's clock,
    the clock the logout marks expire on."""
    frozen = FakeClock()
    with RedisSessionCache(
        redis_server.url, prefix=redis_prefix, clock=frozen, lease_timeout=0.2
    ) as cache:
        assert cache.get("tok") is None
        time.sleep(0.3)  # past the lease on Redis's clock; not on ours
        cache.set("tok", "s", 60)
        assert cache.get("tok") is None
        assert cache.stats()["lease_drops"] == 1


@pytest.mark.parametrize("lost", ["clock", "horizon"])
def test_lost_lease_keys_never_let_a_racing_set_through(
    redis_server: Any, redis_raw: Any, redis_prefix: str, lost: str
) -> None:
    """The clock or the horizon deleted (an eviction policy, a hand) between a miss and the
    logout: the logout still voids the lease (a restarted clock starts from the server's
    time, above every stamp), and a miss after a lost clock is not voided by the logouts
    that came before it."""
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as cache,
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as peer,
    ):
        peer.invalidate("earlier")  # marks and a clock to lose
        assert cache.get("tok") is None
        redis_raw.delete(tag(redis_prefix) + lost)
        peer.invalidate("tok")
        cache.set("tok", "s", 60)
        assert cache.get("tok") is None and peer.get("tok") is None
        redis_raw.delete(tag(redis_prefix) + lost)
        assert cache.get("earlier") is None  # after its logout, and after the loss
        cache.set("earlier", "fresh", 60)
        assert peer.get("earlier") == "fresh"


@pytest.mark.parametrize("secret", [SECRET, None], ids=["fixed-secret", "shared-secret"])
def test_flushdb_between_the_logout_and_the_set(
    own_redis: Any, redis_prefix: str, secret: bytes | None
) -> None:
    """FLUSHDB takes the logout's mark with everything else. Whoever writes the fingerprint
    (fixed secret) or the secret (shared) again marks a clear, so the racing set is still
    dropped."""
    import redis

    raw = redis.Redis(host="127.0.0.1", port=own_redis.port, socket_timeout=TIMEOUT)
    url = own_redis.url
    with (
        RedisSessionCache(url, prefix=redis_prefix, secret=secret) as cache,
        RedisSessionCache(url, prefix=redis_prefix, secret=secret) as peer,
    ):
        assert cache.get("tok") is None
        peer.invalidate("tok")
        raw.flushdb()
        cache.set("tok", "s", 60)
        assert cache.get("tok") is None and peer.get("tok") is None
        cache.set("tok", "s", 60)
        assert peer.get("tok") == "s"
    raw.close()


def test_a_miss_during_an_outage_leaves_a_void_lease(own_redis: Any, redis_prefix: str) -> None:
    """fail_open: a get that could not reach Redis is a miss that knows nothing of the
    logouts of that moment, so the set after it is not stored (one more miss later)."""
    url = own_redis.url
    with (
        RedisSessionCache(
            url, prefix=redis_prefix, secret=SECRET, fail_open=True, timeout=0.5
        ) as cache,
        RedisSessionCache(url, prefix=redis_prefix, secret=SECRET) as peer,
    ):
        own_redis.stop()
        assert cache.get("tok") is None  # refused at once (in this thread: its lease)
        own_redis.start()
        peer.invalidate("tok")
        cache.set("tok", "s", 60)
        assert peer.get("tok") is None
        assert cache.get("tok") is None  # a working miss: a real lease
        cache.set("tok", "s", 60)
        assert peer.get("tok") == "s"
        assert cache.stats()["lease_drops"] == 1


def test_a_dropped_set_takes_the_entry_with_it(
    redis_server: Any, redis_raw: Any, redis_prefix: str
) -> None:
    """The token stays a miss everywhere: a dropped set deletes what is there (here a
    fresh login's session, a false drop that costs one validation) and announces it, so
    hosts drop their copies too."""
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as cache,
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as peer,
    ):
        assert cache.get("tok") is None
        peer.invalidate("tok")
        peer.set("tok", "fresh", 60, user_id="alice")
        pubsub = redis_raw.pubsub()
        pubsub.subscribe(tag(redis_prefix) + "invalidations")
        assert pubsub.get_message(timeout=TIMEOUT)["type"] == "subscribe"
        cache.set("tok", "late", 60, user_id="alice")
        assert pubsub.get_message(timeout=TIMEOUT)["data"] == b"i:" + cache.key_of(
            "tok"
        ).encode()
        pubsub.close()
        assert peer.get("tok") is None
        assert peer.invalidate_by_user("alice") == 0  # its index let go of it too


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", True, None])
def test_bad_lease_timeout_is_refused(redis_server: Any, redis_prefix: str, bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="lease_timeout"):
        RedisSessionCache(redis_server.url, prefix=redis_prefix, lease_timeout=bad)


def test_lease_timeout_in_urls(
    redis_server: Any, redis_prefix: str, make_name: Callable[[], str]
) -> None:
    clock = FakeClock()
    base = f"{redis_server.url}?prefix={redis_prefix}&lease_timeout=2"
    with open_cache(base, clock=clock) as cache:  # type: ignore[attr-defined]
        assert isinstance(cache, RedisSessionCache)
        assert cache.stats()["lease_timeout"] == 2.0
        assert cache.get("tok") is None
        clock.advance(2)
        cache.set("tok", "s", 60)
        assert cache.get("tok") is None
    tiered_url = f"shm+{base}&shm={make_name()}&capacity=64&value_size=256"
    with open_cache(tiered_url, clock=clock) as tiered:  # type: ignore[attr-defined]
        assert isinstance(tiered, TieredSessionCache)
        assert tiered.remote.stats()["lease_timeout"] == 2.0
        assert tiered._local._leases.timeout == 2.0  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match="lease_timeout"):
        open_cache(f"{redis_server.url}?lease_timeout=soon")
    with pytest.raises(InvalidArgument, match="lease_timeout"):
        open_cache(f"{redis_server.url}?lease_timeout=0")
    name = make_name()
    with open_cache(f"shm://{name}?capacity=64&lease_timeout=3") as shm:  # type: ignore[attr-defined]
        assert shm._leases.timeout == 3.0


def test_a_value_that_turns_out_a_miss_still_takes_a_lease(
    redis_server: Any, redis_raw: Any, redis_prefix: str
) -> None:
    """A value past its deadline on the client's clock, or one that is not ours: the get
    script returned it (no lease), the client finds it a miss and asks for a lease."""
    clock = FakeClock()
    url = redis_server.url
    with (
        RedisSessionCache(url, prefix=redis_prefix, clock=clock) as cache,
        RedisSessionCache(url, prefix=redis_prefix, clock=clock) as peer,
    ):
        cache.set("old", "s", 1)
        clock.advance(1)  # past its deadline here, still in Redis for a while
        assert cache.get("old") is None
        peer.invalidate("old")
        cache.set("old", "s", 60)
        assert peer.get("old") is None
        peer.set("forged", "s", 60)
        (key,) = redis_raw.scan_iter(match=tag(redis_prefix) + "s:" + peer.key_of("forged"))
        redis_raw.set(key, b"not a value of ours", keepttl=True)
        assert cache.get("forged") is None
        assert cache.stats()["decode_errors"] == 1
        peer.invalidate("forged")
        cache.set("forged", "s", 60)
        assert peer.get("forged") is None
        assert cache.stats()["lease_drops"] == 2
