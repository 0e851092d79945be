"""The Redis URLs of ``open_cache`` and ``RedisSessionCache``: cluster, Sentinel, valkey-py,
``min_replicas``; and bad ones, which say what is wrong without showing a password.

URLs that name no running server are only parsed: a cache made on a server that cannot be
reached starts anyway (its check waits for the first call), as an app must while Redis is
down.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from _redis_support import within

from shmcache import CacheUnavailable, InvalidArgument, RedisSessionCache, open_cache

BAD_URLS = [
    ("redis+cluster://h:port/", "'h:port' is not host:port"),
    ("redis+cluster://h1:7000,h2:x/", "'h2:x' is not host:port"),
    ("redis+cluster://h1:7000,,h2:7001/", "'' is not host:port"),
    ("redis+cluster://h:7000/1", "database 0 only"),
    ("redis+cluster://h:7000/?db=1", "unknown parameter 'db'"),
    ("redis+sentinel://h:26379/", "redis+sentinel://host:26379/SERVICE[/db]"),
    ("redis+sentinel://h:26379/svc/x", "redis+sentinel://host:26379/SERVICE[/db]"),
    ("redis+sentinel://h:26379/svc/0/1", "redis+sentinel://host:26379/SERVICE[/db]"),
    ("redis+sentinel://h/svc/0?db=1", "the database is given twice"),
    ("redis+sentinel://h/svc?min_replicas=x", "min_replicas must be an integer, got 'x'"),
    ("redis://h?min_replicas=-1", "min_replicas must be an int >= 0"),
    ("redis://h?replica_timeout=0", "replica_timeout must be a finite positive number"),
    ("redis://h?replica_timeout=1&timeout=1", "must be shorter than the client's socket"),
    ("redis://h?prefix=a{b}:", "must not contain braces"),
    ("valkey://h?bogus=1", "unknown parameter 'bogus'"),
    ("unix+cluster:///x", "unknown cache URL scheme 'unix+cluster'"),
    ("redis+shard://h", "unknown cache URL scheme 'redis+shard'"),
    ("shm+redis+cluster://h:7000/", "name the host's segment"),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        open_cache(url)


def test_errors_never_show_a_password() -> None:
    for url in (
        "redis+sentinel://:hunter2@h/svc?sentinel_password=hunter3&bogus=1",
        "redis+cluster://u:hunter2@h1:1,h2:2/?sentinel_password=hunter3",
        "rediss+cluster://:hunter2@h1:x/",
    ):
        with pytest.raises(InvalidArgument) as info:
            open_cache(url)
        assert "hunter2" not in str(info.value) and "hunter3" not in str(info.value)
        assert "***" in str(info.value)


def _client(cache: Any) -> Any:
    return cache._link.client


def test_sentinel_url_parts() -> None:
    """Hosts, service, database, credentials of the data nodes and of the Sentinels, TLS."""
    url = (
        "rediss+sentinel://app:pw@127.0.0.1:1,[::1]:2,localhost/mymaster/3"
        "?sentinel_username=watch&sentinel_password=spw&ssl_cert_reqs=none&prefix=p:"
    )
    with open_cache(url, fail_open=True) as cache:  # type: ignore[attr-defined]
        pool = _client(cache).connection_pool
        assert pool.service_name == "mymaster" and pool.is_master
        kwargs = pool.connection_kwargs
        assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "pw")
        assert "SSL" in pool.connection_class.__name__
        sentinels = pool.sentinel_manager.sentinels
        where = [s.connection_pool.connection_kwargs for s in sentinels]
        assert [(w["host"], w["port"]) for w in where] == [
            ("127.0.0.1", 1), ("::1", 2), ("localhost", 26379)
        ]
        first = where[0]
        assert (first["username"], first["password"]) == ("watch", "spw")
        assert within(lambda: cache.get("tok")) is None  # nobody there: a miss, fail-open


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_cluster_url_parts(scheme: str) -> None:
    with open_cache(  # type: ignore[attr-defined]
        f"{scheme}+cluster://u:pw@127.0.0.1:1,127.0.0.1:2/?prefix=p:&timeout=0.5",
        fail_open=True,
    ) as cache:
        assert within(lambda: cache.get("tok")) is None  # the cluster is down: a miss
        with pytest.raises(CacheUnavailable):
            within(lambda: cache.invalidate("tok"))


def test_valkey_urls_use_valkey_py(redis_server: Any, redis_prefix: str) -> None:
    port = redis_server.port
    for scheme, library in (("valkey", "valkey"), ("redis", "redis")):
        with open_cache(  # type: ignore[attr-defined]
            f"{scheme}://127.0.0.1:{port}/0?prefix={redis_prefix}"
        ) as cache:
            assert type(_client(cache)).__module__.split(".")[0] == library
            cache.set("tok", library, 60)
            assert cache.get("tok") == library


def test_min_replicas_from_the_url(redis_server: Any, redis_prefix: str) -> None:
    """A server without replicas cannot acknowledge: every logout raises, never returns."""
    url = f"{redis_server.url}?prefix={redis_prefix}&min_replicas=1&replica_timeout=0.05"
    with open_cache(url) as cache:  # type: ignore[attr-defined]
        assert isinstance(cache, RedisSessionCache)
        assert cache.stats()["min_replicas"] == 1
        cache.set("tok", "s", 60, user_id="u")  # a set does not wait: a lost one is a miss
        for call in (lambda: cache.invalidate("tok"), lambda: cache.invalidate_by_user("u"),
                     cache.clear):
            with pytest.raises(CacheUnavailable, match="0 of the 1 replicas"):
                call()
