"""RedisSessionCache against a real redis-server.

The contract suite (tests/test_contract.py) already runs it; here is what only it has: keys
that never hold a token, values that cannot be forged or moved, a hashing secret that hosts
share, a Redis that stops or hangs mid-run, and two "hosts" in separate processes.

A server that must be stopped or paused is the test's own (``own_redis``); the others
share one. Calls that could hang run under ``within``, which fails the test after a
generous timeout instead of hanging the suite.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import _redis_support
import pytest
from _redis_support import (
    TIMEOUT,
    Host,
    eventually,
    keys_and_values,
    tiered,
    within,
)

from shmcache import (
    CacheClosed,
    CacheUnavailable,
    InvalidArgument,
    InvalidType,
    RedisSessionCache,
    ShmCacheError,
)
from shmcache.redis import values
from shmcache.redis.secret import derive

SECRET = b"test-secret-of-at-least-16-bytes"


def tag(prefix: str) -> str:
    """What every key of a cache with ``prefix`` starts with (its cluster hash tag)."""
    return "{" + prefix + "}"


# -- RedisSessionCache: the protocol's edges ---------------------------------------------


@pytest.fixture(params=["shared-secret", "fixed-secret"])
def rcache(
    request: pytest.FixtureRequest, redis_server: _redis_support.RedisServer, redis_prefix: str
) -> Iterator[RedisSessionCache]:
    secret = SECRET if request.param == "fixed-secret" else None
    with RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=secret) as cache:
        yield cache


@pytest.mark.parametrize(
    "token", ["", "x" * (1 << 20), "\ud800", "a\udfffb", "\x00", "é" * 300, "never-set"]
)
def test_get_any_str_is_a_miss(rcache: RedisSessionCache, token: str) -> None:
    rcache.set("present", "p", 60)
    assert rcache.get(token) is None
    assert rcache.get("present") == "p"


def test_surrogate_token_roundtrip(rcache: RedisSessionCache) -> None:
    rcache.set("\ud800", "s", 60)
    assert rcache.get("\ud800") == "s"
    rcache.invalidate("\ud800")
    assert rcache.get("\ud800") is None


@pytest.mark.parametrize("token", [b"tok", 1, None, 1.5, ("t",), ["t"]])
def test_non_str_token_is_type_error(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str, token: Any
) -> None:
    rcache.set("keep", "kept", 60)
    before = keys_and_values(redis_raw, tag(redis_prefix))
    for call in (
        lambda: rcache.get(token),
        lambda: rcache.set(token, "s", 60),
        lambda: rcache.invalidate(token),
    ):
        with pytest.raises(InvalidType) as info:
            call()
        assert isinstance(info.value, TypeError)
    assert keys_and_values(redis_raw, tag(redis_prefix)) == before
    assert rcache.get("keep") == "kept"


@pytest.mark.parametrize(
    ("token", "ttl"),
    [
        ("", 60),
        ("tok", 0),
        ("tok", -1),
        ("tok", 0.0),
        ("tok", float("nan")),
        ("tok", float("inf")),
        ("tok", float("-inf")),
        ("tok", "10"),
        ("tok", None),
        ("tok", True),
        ("keep", 0),
        ("keep", float("nan")),
    ],
)
def test_set_rejects_bad_input_and_changes_nothing(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str, token: str, ttl: Any
) -> None:
    rcache.set("keep", "kept", 60)
    before = keys_and_values(redis_raw, tag(redis_prefix))
    with pytest.raises(InvalidArgument) as info:
        rcache.set(token, "new", ttl)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ShmCacheError)
    assert keys_and_values(redis_raw, tag(redis_prefix)) == before
    assert rcache.get("keep") == "kept"


@pytest.mark.parametrize("ttl", [1e300, sys.float_info.max, 10**400])
def test_huge_finite_ttl_is_accepted(rcache: RedisSessionCache, ttl: float) -> None:
    rcache.set("tok", "s", ttl)
    assert rcache.get("tok") == "s"
    rcache.set("user-tok", "u", ttl, user_id="u")  # the user's index takes it too
    assert rcache.get("user-tok") == "u"
    assert rcache.invalidate_by_user("u") == 1


# -- what Redis holds -----------------------------------------------------------------------


def test_tokens_never_reach_redis(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str
) -> None:
    token = "bearer-token-that-must-stay-secret"
    rcache.get("warm-up")  # the shared secret is made (and announced) before we listen
    pubsub = redis_raw.pubsub()
    pubsub.subscribe(tag(redis_prefix) + "invalidations")
    assert pubsub.get_message(timeout=TIMEOUT)["type"] == "subscribe"
    rcache.set(token, {"user": "alice"}, 60)
    stored = keys_and_values(redis_raw, tag(redis_prefix))
    session_keys = [k for k in stored if k.startswith((tag(redis_prefix) + "s:").encode())]
    assert len(session_keys) == 1
    digest = session_keys[0][len(tag(redis_prefix)) + 2 :]
    assert len(digest) == 32 and all(c in b"0123456789abcdef" for c in digest)
    rcache.invalidate(token)
    message = pubsub.get_message(timeout=TIMEOUT)
    assert message["data"] == b"i:" + digest
    pubsub.close()
    blob = b"".join(k + (v if isinstance(v, bytes) else b"") for k, v in stored.items())
    assert token.encode() not in blob
    assert token.encode() not in message["data"]


def test_ttl_is_a_redis_expiry_in_ms(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str
) -> None:
    rcache.set("tok", "s", 1.5)
    (key,) = [k for k in redis_raw.scan_iter(match=tag(redis_prefix) + "s:*")]
    assert 1000 < redis_raw.pttl(key) <= 1500
    rcache.set("short", "s", 0.05)  # Redis itself drops it: no clock of ours is involved
    eventually(lambda: rcache.get("short") is None, "expiry of a 50 ms entry")
    assert rcache.get("tok") == "s"


def test_clear_removes_only_this_prefix(
    redis_server: _redis_support.RedisServer, redis_raw: Any
) -> None:
    tag = os.urandom(4).hex()
    glob_prefix = f"t{tag}*[x]:"  # glob characters in a prefix match only themselves
    lookalike = f"t{tag}Qx:"  # what "*[x]" would match if it were not escaped
    with (
        RedisSessionCache(redis_server.url, prefix=glob_prefix) as a,
        RedisSessionCache(redis_server.url, prefix=lookalike) as b,
    ):
        redis_raw.set(f"t{tag}-unrelated", b"v")
        for i in range(2500):  # more than one SCAN batch
            a.set(f"tok{i}", i, 60)
        b.set("tok1", "b's", 60)
        a.clear()
        assert all(a.get(f"tok{i}") is None for i in (0, 1, 1234, 2499))
        assert not list(
            redis_raw.scan_iter(
                match=glob_prefix.replace("*", "\\*").replace("[", "\\[").replace("]", "\\]")
                + "s:*"
            )
        )
        assert b.get("tok1") == "b's"
        assert redis_raw.get(f"t{tag}-unrelated") == b"v"
        a.set("tok1", "again", 60)
        assert a.get("tok1") == "again"
        redis_raw.delete(f"t{tag}-unrelated")


def test_values_cannot_be_forged_or_moved(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    with RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=SECRET) as cache:
        cache.set("alice", {"user": "alice", "admin": True}, 60)
        cache.set("mallory", {"user": "mallory"}, 60)
        alice_key = tag(redis_prefix) + "s:" + cache.key_of("alice")
        mallory_key = tag(redis_prefix) + "s:" + cache.key_of("mallory")
        # Mallory can write Redis: copy Alice's value under her own token's key.
        redis_raw.set(mallory_key, redis_raw.get(alice_key), px=60000)
        assert cache.get("mallory") is None
        for bad in (
            b"",
            b"\x01",
            redis_raw.get(alice_key)[:-1],
            b"\x01" + redis_raw.get(alice_key)[1:],  # version 1 (no owner) is gone
            b"\x03" + redis_raw.get(alice_key)[1:],
        ):
            redis_raw.set(mallory_key, bad, px=60000)
            assert cache.get("mallory") is None
        redis_raw.delete(mallory_key)
        redis_raw.hset(mallory_key, "f", "v")  # another type under the key: WRONGTYPE on GET
        assert cache.get("mallory") is None
        # Written by a program with another secret: a valid value for that secret, at this key.
        forged = values.pack(
            derive(b"another-secret-16-bytes-or-more", shared=False),
            mallory_key,
            0,
            bytes(16),
            pickle.dumps("forged"),
        )
        redis_raw.delete(mallory_key)
        redis_raw.set(mallory_key, forged, px=60000)
        assert cache.get("mallory") is None
        assert cache.get("alice") == {"user": "alice", "admin": True}
        assert cache.stats()["decode_errors"] >= 6


@pytest.mark.parametrize("library", ["redis", "valkey"])
def test_client_object(
    redis_server: _redis_support.RedisServer, redis_prefix: str, library: str
) -> None:
    """A client object of either library (redis-py's ``Redis``, valkey-py's ``Valkey``)."""
    lib = importlib.import_module(library)
    make = getattr(lib, "Valkey", None) or lib.Redis
    where = {"host": "127.0.0.1", "port": redis_server.port}
    client = make(socket_timeout=TIMEOUT, **where)
    with RedisSessionCache(client, prefix=redis_prefix) as cache:
        cache.set("tok", "s", 60, user_id="u")
        assert cache.get("tok") == "s"
        cache.invalidate("tok")
        cache.set("tok", "s", 60, user_id="u")
        assert cache.invalidate_by_user("u") == 1
    assert client.ping()  # closing the cache left the caller's client alone
    client.close()
    decoding = make(decode_responses=True, **where)
    with pytest.raises(InvalidArgument, match="decode_responses"):
        RedisSessionCache(decoding)
    decoding.close()
    with pytest.raises(InvalidArgument, match="timeout"):
        RedisSessionCache(make(**where), timeout=1.0)
    with pytest.raises(InvalidType):
        RedisSessionCache(42)
    for bad in (
        {"prefix": ""},
        {"prefix": "a{b}:"},  # braces are the cluster hash tag's
        {"secret": b"short"},
        {"fail_open": "yes"},
        {"timeout": 0},
        {"min_replicas": -1},
        {"min_replicas": True},
        {"replica_timeout": 0},
        {"replica_timeout": 1.0},  # WAIT would outlast the socket timeout (1 s)
    ):
        with pytest.raises(InvalidArgument):
            RedisSessionCache(redis_server.url, **bad)
    for url in (
        redis_server.url + "?timeout=1",
        redis_server.url + "?prefix=p:",
    ):  # open_cache's, not ours
        with pytest.raises(InvalidArgument, match=r"not a (redis|valkey)-py connection option"):
            RedisSessionCache(url)


def test_use_after_close(
    redis_server: _redis_support.RedisServer,
    redis_prefix: str,
    make_name: Callable[[], str],
    clock: Any,
) -> None:
    caches = [
        RedisSessionCache(redis_server.url, prefix=redis_prefix),
        tiered(redis_server.url, make_name(), clock, prefix=redis_prefix),
    ]
    for cache in caches:
        cache.set("tok", "s", 60)
        cache.close()
        cache.close()  # idempotent
        assert cache.closed
        for method, args in (
            (cache.get, ("tok",)),
            (cache.set, ("tok", "s", 60)),
            (cache.invalidate, ("tok",)),
            (cache.invalidate_by_user, ("u",)),
            (cache.clear, ()),
        ):
            with pytest.raises(CacheClosed):
                method(*args)


def test_import_without_redis_py(make_name: Callable[[], str]) -> None:
    """The core works without the extras; the Redis backend says how to get one."""
    script = f"""
import sys
sys.modules["redis"] = None  # what an environment without redis-py looks like
sys.modules["valkey"] = None  # (nor valkey-py)
import shmcache
assert shmcache.open_cache("memory://") is not None
c = shmcache.open_cache("shm://{make_name()}?capacity=8")
c.unlink(); c.close()
for make in (lambda: shmcache.RedisSessionCache("redis://127.0.0.1:1/0"),
             lambda: shmcache.open_cache("redis://127.0.0.1:1/0")):
    try:
        make()
    except ImportError as exc:
        assert "shmcache[redis]" in str(exc), exc
    else:
        raise AssertionError("no ImportError")
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# -- users: the per-user index (issue 6) ----------------------------------------------------


def _index(client: Any, prefix: str) -> dict[bytes, list[tuple[bytes, float]]]:
    return {
        key: client.zrange(key, 0, -1, withscores=True)
        for key in client.scan_iter(match=prefix + "u:*")
    }


def test_user_ids_never_reach_redis(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str
) -> None:
    user = "alice@example.com"
    rcache.get("warm-up")  # the shared secret is made (and announced) before we listen
    pubsub = redis_raw.pubsub()
    pubsub.subscribe(tag(redis_prefix) + "invalidations")
    assert pubsub.get_message(timeout=TIMEOUT)["type"] == "subscribe"
    rcache.set("tok", {"n": 1}, 60, user_id=user)
    rcache.set("tok2", {"n": 2}, 60, user_id=user)
    stored = keys_and_values(redis_raw, tag(redis_prefix))
    index = _index(redis_raw, tag(redis_prefix))
    (index_key,) = index
    digest = index_key[len(tag(redis_prefix)) + 2 :]
    assert len(digest) == 32 and all(c in b"0123456789abcdef" for c in digest)
    assert sorted(m for m, _ in index[index_key]) == sorted(
        rcache.key_of(t).encode() for t in ("tok", "tok2")
    )
    assert rcache.invalidate_by_user(user) == 2
    message = pubsub.get_message(timeout=TIMEOUT)
    assert message["data"] == b"u:" + digest
    pubsub.close()
    blob = b"".join(
        k + (v if isinstance(v, bytes) else b"") for k, v in stored.items()
    ) + b"".join(m for members in index.values() for m, _ in members)
    assert user.encode() not in blob and user.encode() not in message["data"]
    assert keys_and_values(redis_raw, tag(redis_prefix) + "u:") == {}  # the index went too


def test_owner_is_authenticated(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str
) -> None:
    """The owner bytes are under the MAC: a value moved to another user is a miss."""
    rcache.set("tok", "s", 60, user_id="mallory")
    key = tag(redis_prefix) + "s:" + rcache.key_of("tok")
    raw = redis_raw.get(key)
    redis_raw.set(key, raw[:9] + bytes(16) + raw[25:], px=60000)  # "no user": unrevocable
    assert rcache.get("tok") is None
    redis_raw.set(key, raw, px=60000)
    assert rcache.get("tok") == "s"
    assert rcache.invalidate_by_user("mallory") == 1


def test_index_stays_small(rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str) -> None:
    """Members leave an index when their token logs out, moves to another user, or has
    expired when the index is next written to; the index expires with its last session."""
    for i in range(5):
        rcache.set(f"t{i}", i, 60, user_id="u")
    (index_key,) = _index(redis_raw, tag(redis_prefix))
    assert redis_raw.zcard(index_key) == 5
    rcache.invalidate("t0")
    rcache.set("t1", 1, 60, user_id="v")  # moves to v's index
    rcache.set("t2", 2, 60)  # no user any more
    assert redis_raw.zcard(index_key) == 2
    # Members whose sessions expired long ago (scores are expiry times in ms).
    redis_raw.zadd(index_key, {f"{i:032x}": 1000 + i for i in range(100)})
    rcache.set("t3", 3, 60, user_id="u")
    assert redis_raw.zcard(index_key) == 2
    rcache.set("long", "l", 3600, user_id="u")
    assert 3_600_000 < redis_raw.pttl(index_key) <= 3_601_000
    assert rcache.invalidate_by_user("u") == 3
    assert redis_raw.exists(index_key) == 0


def test_expired_token_reused_by_another_user(
    rcache: RedisSessionCache, redis_raw: Any, redis_prefix: str
) -> None:
    """A session that expired leaves its member in the old user's index until it is
    pruned; if its token is set again for someone else meanwhile, revoking the old user
    must not take the new owner's session."""
    rcache.set("tok", "a's", 60, user_id="a")
    redis_raw.delete(tag(redis_prefix) + "s:" + rcache.key_of("tok"))  # as Redis expires it
    rcache.set("tok", "b's", 60, user_id="b")
    assert rcache.invalidate_by_user("a") == 0
    assert rcache.get("tok") == "b's"
    assert rcache.invalidate_by_user("b") == 1


def test_invalidate_by_user_counts_with_redis_expiry(rcache: RedisSessionCache) -> None:
    rcache.set("a", 1, 60, user_id=3)
    rcache.set("b", 2, 60, user_id=3)
    rcache.set("brief", 3, 0.05, user_id=3)
    eventually(lambda: rcache.get("brief") is None, "expiry of a 50 ms entry")
    assert rcache.invalidate_by_user(3) == 2  # the expired one is not counted


def test_revoke_more_sessions_than_one_unlink_batch(rcache: RedisSessionCache) -> None:
    for i in range(600):  # the script deletes in batches of 256
        rcache.set(f"t{i}", i, 60, user_id="busy")
    rcache.set("calm", "c", 60, user_id="calm")
    assert rcache.invalidate_by_user("busy") == 600
    assert all(rcache.get(f"t{i}") is None for i in (0, 255, 256, 511, 512, 599))
    assert rcache.get("calm") == "c"


def test_forgotten_scripts_are_loaded_again(rcache: RedisSessionCache, redis_raw: Any) -> None:
    """A Redis restart (or SCRIPT FLUSH) forgets our scripts: every call still works."""
    for call in (
        lambda: rcache.set("tok", "s", 60, user_id="u"),
        lambda: rcache.invalidate("tok"),
        lambda: rcache.set("tok", "s", 60, user_id="u"),
        lambda: rcache.invalidate_by_user("u"),
    ):
        redis_raw.script_flush()
        call()
    assert rcache.get("tok") is None
    rcache.set("tok", "s", 60, user_id="u")
    redis_raw.script_flush()
    assert rcache.invalidate_by_user("u") == 1


# -- Redis stopped or hung mid-run ----------------------------------------------------------


def test_redis_stopped_raises_and_recovers(
    own_redis: _redis_support.RedisServer, redis_prefix: str
) -> None:
    with RedisSessionCache(own_redis.url, prefix=redis_prefix, timeout=0.5) as cache:
        cache.set("tok", "s", 60)
        own_redis.stop()
        for call in (
            lambda: cache.get("tok"),
            lambda: cache.set("tok", "s", 60),
            lambda: cache.invalidate("tok"),
            lambda: cache.invalidate_by_user("u"),
            cache.clear,
        ):
            with pytest.raises(CacheUnavailable) as info:
                within(call)
            assert isinstance(info.value, ConnectionError)
            assert isinstance(info.value, ShmCacheError)
        assert cache.stats()["unavailable"] == 5
        own_redis.start()  # same port, empty (nothing persisted): the client reconnects
        assert within(lambda: cache.get("tok")) is None
        cache.set("tok", "again", 60)
        assert cache.get("tok") == "again"


def test_redis_stopped_fail_open(own_redis: _redis_support.RedisServer, redis_prefix: str) -> None:
    with RedisSessionCache(
        own_redis.url, prefix=redis_prefix, timeout=0.5, fail_open=True
    ) as cache:
        cache.set("tok", "s", 60)
        own_redis.stop()
        assert within(lambda: cache.get("tok")) is None
        within(lambda: cache.set("other", "s", 60))  # counted, nothing stored, no error
        stats = cache.stats()
        assert (stats["unavailable"], stats["misses"]) == (2, 1)
        # A logout is never reported as done when Redis did not see it, fail-open or not.
        with pytest.raises(CacheUnavailable):
            within(lambda: cache.invalidate("tok"))
        with pytest.raises(CacheUnavailable):
            within(lambda: cache.invalidate_by_user("u"))
        with pytest.raises(CacheUnavailable):
            within(cache.clear)
        assert cache.stats()["unavailable"] == 5


def test_redis_hung_times_out(own_redis: _redis_support.RedisServer, redis_prefix: str) -> None:
    with RedisSessionCache(own_redis.url, prefix=redis_prefix, timeout=0.2) as cache:
        cache.set("tok", "s", 60)
        own_redis.pause()
        try:
            with pytest.raises(CacheUnavailable, match="Timeout"):
                within(lambda: cache.get("tok"))
            with pytest.raises(CacheUnavailable):
                within(lambda: cache.invalidate("tok"))
            with pytest.raises(CacheUnavailable):
                within(lambda: cache.invalidate_by_user("u"))
        finally:
            own_redis.resume()
        # The invalidate may or may not have reached Redis before the timeout (it is
        # reported as not done, which is the safe answer); the cache works again either way.
        assert within(lambda: cache.get("tok")) in (None, "s")
        cache.invalidate("tok")
        assert cache.get("tok") is None


# -- two hosts: separate processes, separate caches, one Redis ------------------------------


def test_two_hosts_plain_redis(redis_server: _redis_support.RedisServer, redis_prefix: str) -> None:
    url = f"{redis_server.url}?prefix={redis_prefix}"
    a = Host(url, user_id_of=_redis_support.session_user)
    b = Host(url, user_id_of=_redis_support.session_user)
    try:
        a("set", "tok", {"user": "alice"}, 60)
        assert b("get", "tok") == {"user": "alice"}
        a("invalidate", "tok")
        assert b("get", "tok") is None  # right after a's invalidate returned
        a("set", "tok", {"user": "alice"}, 60)
        b("set", "tok2", {"user": "alice"}, 60)
        b("set", "bob", {"user": "bob"}, 60)
        assert a("invalidate_by_user", "alice") == 2
        assert b("get", "tok") is None and b("get", "tok2") is None
        assert b("get", "bob") == {"user": "bob"}
        b("set", "t2", "x", 60)
        assert a("get", "t2") == "x"
        a("clear")
        assert b("get", "t2") is None
    finally:
        a.stop()
        b.stop()
