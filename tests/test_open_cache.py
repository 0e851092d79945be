"""``open_cache``: one configuration string chooses the backend; bad ones say what is wrong."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import _redis_support
import pytest

from shmcache import (
    InMemorySessionCache,
    InvalidArgument,
    InvalidType,
    JsonCodec,
    NoOpSessionCache,
    RedisSessionCache,
    SessionCache,
    SharedMemorySessionCache,
    ShmCacheError,
    TieredSessionCache,
    open_cache,
)


@pytest.fixture
def opened() -> Iterator[Callable[..., Any]]:
    """``open_cache`` whose results are closed after the test."""
    caches: list[Any] = []

    def open_(url: str, **options: Any) -> Any:
        cache = open_cache(url, **options)
        caches.append(cache)
        return cache

    yield open_
    for cache in caches:
        close = getattr(cache, "close", None)
        if close is not None:
            close()


@pytest.fixture
def server() -> _redis_support.RedisServer:
    return _redis_support.shared_server()


def test_memory_and_noop(opened: Callable[..., Any], clock: Any) -> None:
    memory = opened("memory://", clock=clock)
    assert type(memory) is InMemorySessionCache
    memory.set("tok", "s", 1)
    clock.advance(1)
    assert memory.get("tok") is None  # the clock option reached it
    assert type(opened("MEMORY://")) is InMemorySessionCache
    assert type(opened("noop://")) is NoOpSessionCache


def test_shm_creates_then_attaches(opened: Callable[..., Any], segment_name: str) -> None:
    first = opened(f"shm://{segment_name}?capacity=64&value_size=128&lock_timeout=2")
    assert isinstance(first, SharedMemorySessionCache)
    assert (first.capacity, first.value_size) == (64, 128)
    first.set("tok", {"u": 1}, 60)
    second = opened(f"shm://{segment_name}")  # attaches, whatever it has
    assert second.get("tok") == {"u": 1}
    third = opened(f"shm:///{segment_name}?capacity=64", codec=JsonCodec())  # path form
    assert third.capacity == 64
    with pytest.raises(InvalidArgument, match=r"capacity 64 \(asked: 32\)"):
        open_cache(f"shm://{segment_name}?capacity=32")
    with pytest.raises(InvalidArgument, match=r"value_size 128 \(asked: 0\)"):
        open_cache(f"shm://{segment_name}?value_size=0")
    first.unlink()


def test_shm_defaults(opened: Callable[..., Any], segment_name: str) -> None:
    cache = opened(f"shm://{segment_name}")
    assert (cache.capacity, cache.value_size) == (65536, 0)  # as SharedMemorySessionCache
    cache.unlink()


def test_redis_urls(
    opened: Callable[..., Any], server: _redis_support.RedisServer, make_name: Callable[[], str]
) -> None:
    prefix = make_name() + ":"
    a = opened(f"{server.url}?prefix={prefix}&fail_open=true&timeout=2&socket_keepalive=true")
    assert isinstance(a, RedisSessionCache)
    assert a.stats()["prefix"] == prefix and a.fail_open
    a.set("tok", "s", 60)
    b = opened(f"unix://{server.socket_path}?db=0&prefix={prefix}")
    assert b.get("tok") == "s"  # the same database over the unix socket
    c = opened(f"redis://127.0.0.1:{server.port}?prefix=ignored:", prefix=prefix)
    assert c.get("tok") == "s"  # keyword options win over the URL
    other_db = opened(f"redis://127.0.0.1:{server.port}/1?prefix={prefix}")
    assert other_db.get("tok") is None
    tls = opened("rediss://user:pw@localhost:6380/2?ssl_cert_reqs=none")  # not contacted
    assert isinstance(tls, RedisSessionCache)


def test_tiered_url(
    opened: Callable[..., Any], server: _redis_support.RedisServer, make_name: Callable[[], str]
) -> None:
    prefix, name = make_name() + ":", make_name()
    url = (
        f"shm+redis://127.0.0.1:{server.port}/0?prefix={prefix}&shm={name}&capacity=64"
        "&value_size=256&max_staleness=2.5&subscribe=false"
    )
    cache = opened(url)
    assert isinstance(cache, TieredSessionCache)
    assert isinstance(cache, SessionCache)
    stats = cache.stats()
    assert stats["max_staleness"] == 2.5
    assert (stats["local"]["capacity"], stats["local"]["value_size"]) == (64, 256)
    cache.set("tok", "s", 60)
    plain = opened(f"{server.url}?prefix={prefix}")
    assert plain.get("tok") == "s"  # the same Redis entry as a plain Redis cache sees
    via_unix = opened(
        f"shm+unix://{server.socket_path}?prefix={prefix}&shm={name}", subscribe=False
    )
    assert via_unix.get("tok") == "s"


BAD_URLS = [
    ("", "no scheme"),
    ("localhost:6379", "has no scheme"),
    ("memcached://h", "unknown cache URL scheme 'memcached'"),
    ("ftp://h", "unknown cache URL scheme 'ftp'"),
    ("memory://host", "takes no host or path"),
    ("memory://?capacity=1", "unknown parameter 'capacity'"),
    ("noop:///x", "takes no host or path"),
    ("shm://", "shm://NAME"),
    ("shm://a/b", "shm://NAME"),
    ("shm://bad name!", "bad segment name"),
    ("shm://NAME?capacity=abc", "capacity must be an integer, got 'abc'"),
    ("shm://NAME?capacity=0", "capacity must be between"),
    ("shm://NAME?value_size=-1", "value_size must be between"),
    ("shm://NAME?lock_timeout=0", "lock_timeout must be a finite positive number"),
    ("shm://NAME?size=10", "unknown parameter 'size'"),
    ("shm://NAME?capacity=1&capacity=2", "'capacity' is given twice"),
    ("shm://NAME?capacity", "bad query string"),
    ("redis://h:port/0", "Port could not be cast"),
    ("redis://h/abc", "must be a database number"),
    ("redis://h/0#frag", "no #fragment"),
    ("redis://h?fail_open=maybe", "fail_open must be true or false"),
    ("redis://h?timeout=-1", "timeout must be a finite positive number"),
    ("redis://h?timeout=nan", "timeout must be a finite positive number"),
    ("redis://h?prefix=", "prefix must not be empty"),
    ("redis://h?bogus=1", "unknown parameter 'bogus'"),
    ("redis://h?shm=x", "unknown parameter 'shm'"),
    ("unix://", "give the socket path"),
    ("shm+redis://h/0", "name the host's segment"),
    ("shm+redis://h/0?shm=NAME&max_staleness=0", "max_staleness must be a finite positive"),
    ("shm+redis://h/0?shm=NAME&subscribe=sometimes", "subscribe must be true or false"),
    ("shm+memcached://h", "unknown cache URL scheme 'shm+memcached'"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[u or "empty" for u, _ in BAD_URLS])
def test_bad_urls_say_what_is_wrong(url: str, message: str, make_name: Callable[[], str]) -> None:
    _redis_support.require_redis()  # the Redis URLs are checked against redis-py's options
    url = url.replace("NAME", make_name())
    with pytest.raises(InvalidArgument, match=re.escape(message)) as info:
        open_cache(url)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ShmCacheError)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("memory://", {"capacity": 5}, "option 'capacity' does not apply"),
        ("noop://", {"clock": None}, "option 'clock' does not apply"),
        ("shm://NAME", {"prefix": "p"}, "option 'prefix' does not apply"),
        ("redis://h", {"max_staleness": 1}, "option 'max_staleness' does not apply"),
        ("redis://h", {"secret": b"short"}, "at least 16 bytes"),
    ],
)
def test_bad_options_say_what_is_wrong(
    url: str, options: dict[str, Any], message: str, make_name: Callable[[], str]
) -> None:
    _redis_support.require_redis()
    with pytest.raises(InvalidArgument, match=message):
        open_cache(url.replace("NAME", make_name()), **options)


def test_errors_never_show_the_password() -> None:
    _redis_support.require_redis()
    for url in ("redis://user:hunter2@h:6379/0?bogus=1", "redis://:hunter2@h/x"):
        with pytest.raises(InvalidArgument) as info:
            open_cache(url)
        assert "hunter2" not in str(info.value)
        assert "***" in str(info.value)


def test_url_must_be_a_str() -> None:
    with pytest.raises(InvalidType):
        open_cache(b"memory://")  # type: ignore[arg-type]


@pytest.mark.parametrize("scheme", ["memory", "noop", "shm", "redis", "shm+redis"])
def test_user_id_of_reaches_every_backend(
    opened: Callable[..., Any], scheme: str, make_name: Callable[[], str]
) -> None:
    """An app passes ``user_id_of`` whatever URL it is given (issue 6)."""
    name, prefix = make_name(), make_name() + ":"
    if scheme in ("memory", "noop"):
        url = scheme + "://"
    elif scheme == "shm":
        url = f"shm://{name}?capacity=64&value_size=128"
    else:
        url = f"{_redis_support.shared_server().url}?prefix={prefix}"  # fails without one
        if scheme == "shm+redis":
            url = f"shm+{url}&shm={name}&value_size=128&subscribe=false"
    cache = opened(url, user_id_of=lambda session: session["uid"])
    cache.set("a", {"uid": 7}, 60)
    cache.set("b", {"uid": "7"}, 60)
    cache.set("c", {"uid": 8}, 60)
    expected = 0 if scheme == "noop" else 2
    assert cache.invalidate_by_user(7) == expected
    assert cache.get("a") is None
    assert cache.get("c") == (None if scheme == "noop" else {"uid": 8})
    if scheme == "shm":
        cache.unlink()
