"""One secret per deployment, checked; and no pickle that a Redis reader can feed the app.

The secret behind the keyed hashes is either the caller's ``secret=`` or one kept in Redis
(shared mode). A fingerprint of it is stored beside the keys at first use: a host whose
secret differs fails loudly (``SecretMismatch``) instead of silently missing the others'
logouts. Without ``secret=`` anyone who reads Redis holds the secret, so the default codec
is JSON and ``PickleCodec`` is refused.
"""

from __future__ import annotations

import builtins
import pickle
import re
import subprocess
import sys
from typing import Any

import _redis_support
import pytest
from _redis_support import TIMEOUT

from shmcache import (
    CacheUnavailable,
    IncompatibleSegment,
    InvalidArgument,
    InvalidType,
    JsonCodec,
    PickleCodec,
    RedisSessionCache,
    SecretMismatch,
    open_cache,
)
from shmcache.redis import values
from shmcache.redis.secret import derive

SECRET = b"test-secret-of-at-least-16-bytes"
OTHER = b"another-secret-of-16-bytes-or-more"


def tag(prefix: str) -> str:
    return "{" + prefix + "}"


# -- the fingerprint ---------------------------------------------------------------------


def test_two_hosts_different_secrets_the_second_fails_loudly(
    redis_server: _redis_support.RedisServer, redis_prefix: str
) -> None:
    """Two host processes, one prefix, different secrets (a deploy that rotated the secret on
    one host only): the second refuses to start, naming the prefix and never a secret."""
    url = f"{redis_server.url}?prefix={redis_prefix}"
    script = (
        "import sys; from shmcache import open_cache\n"
        "cache = open_cache(sys.argv[1], secret=sys.argv[2].encode())\n"
        "cache.set('tok', 'from ' + sys.argv[2][:5], 60); print(cache.get('tok'))\n"
    )

    def host(secret: bytes) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, url, secret.decode()],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    first = host(SECRET)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "from test-"
    second = host(OTHER)
    assert second.returncode != 0
    assert "SecretMismatch" in second.stderr and redis_prefix in second.stderr
    for secret in (SECRET, OTHER):
        assert secret.decode() not in second.stderr
    assert host(SECRET).returncode == 0  # the right secret still works


def test_mismatch_is_an_incompatible_segment_naming_the_prefix(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    with RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=SECRET) as a:
        a.set("tok", "s", 60)
        stored = redis_raw.get(tag(redis_prefix) + "fingerprint")
        assert re.fullmatch(rb"fixed:[0-9a-f]{32}", stored)
        assert SECRET not in stored
        with pytest.raises(SecretMismatch) as info:
            RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=OTHER)
        assert isinstance(info.value, IncompatibleSegment)
        assert redis_prefix in str(info.value)
        assert SECRET.decode() not in str(info.value) and OTHER.decode() not in str(info.value)
        with RedisSessionCache(
            redis_server.url, prefix=redis_prefix, secret=SECRET.decode()
        ) as same:  # the same secret as str
            assert same.get("tok") == "s"
        assert a.stats()["shared_secret"] is False


@pytest.mark.parametrize("first", ["fixed", "shared"])
def test_fixed_and_shared_secrets_do_not_mix(
    redis_server: _redis_support.RedisServer, redis_prefix: str, first: str
) -> None:
    """One host passes secret=, another does not: they would hash with different secrets."""
    fixed = {"secret": SECRET}
    shared: dict[str, Any] = {}
    before, after = (fixed, shared) if first == "fixed" else (shared, fixed)
    with RedisSessionCache(redis_server.url, prefix=redis_prefix, **before) as a:
        a.set("tok", "s", 60)
        with pytest.raises(SecretMismatch, match=re.escape(repr(redis_prefix))):
            RedisSessionCache(redis_server.url, prefix=redis_prefix, **after)
        assert a.get("tok") == "s"


def test_fingerprint_written_again_after_a_flush(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    """A FLUSHDB removes the fingerprint: the next call writes it again, so a host with
    another secret that starts afterwards still fails; one that got there first makes the
    others fail at their next call, loudly, instead of splitting the hosts in two."""
    key = tag(redis_prefix) + "fingerprint"
    with RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=SECRET) as a:
        a.set("tok", "s", 60)
        stored = redis_raw.get(key)
        redis_raw.delete(key)
        assert a.get("tok") == "s"
        assert redis_raw.get(key) == stored
        with pytest.raises(SecretMismatch):
            RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=OTHER)
        redis_raw.delete(key)
        with RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=OTHER) as b:
            b.set("tok", "b's", 60)
            for call in (lambda: a.get("tok"), lambda: a.invalidate("tok")):
                with pytest.raises(SecretMismatch):
                    call()
            assert b.get("tok") == "b's"


def test_shared_secret_is_created_once(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as a,
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s", 60)
        secret = redis_raw.get(tag(redis_prefix) + "secret")
        assert len(secret) == 32
        assert re.fullmatch(
            rb"shared:[0-9a-f]{32}", redis_raw.get(tag(redis_prefix) + "fingerprint")
        )
        assert b.get("tok") == "s"
        assert redis_raw.get(tag(redis_prefix) + "secret") == secret
        assert a.key_of("tok") == b.key_of("tok")
        assert a.stats()["shared_secret"] is True


@pytest.mark.parametrize("lost", [("secret",), ("secret", "fingerprint"), ("fingerprint",)])
def test_lost_secret_never_splits_hosts(
    redis_server: _redis_support.RedisServer,
    redis_raw: Any,
    redis_prefix: str,
    lost: tuple[str, ...],
) -> None:
    """A secret deleted under the hosts' feet (FLUSHDB, an allkeys eviction policy: one or
    both keys) must not leave hosts hashing with different secrets: a logout on one would
    miss the other's key. ``a`` and ``b`` learnt the first secret; ``c`` starts after it
    was lost."""
    doomed = [tag(redis_prefix) + name for name in lost]
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as a,
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as b,
    ):
        a.set("tok", "s1", 60)
        assert b.get("tok") == "s1"
        redis_raw.delete(*doomed)
        with RedisSessionCache(redis_server.url, prefix=redis_prefix) as c:
            c.get("warm-up")
            a.set("tok", "s2", 60)
            assert c.get("tok") == "s2"
            redis_raw.delete(*doomed)
            b.set("tok", "s3", 60)
            c.invalidate("tok")  # the logout, on a host that held an older secret
            assert a.get("tok") is None
            assert b.get("tok") is None
            assert c.get("tok") is None


def test_secret_key_of_another_program(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    redis_raw.rpush(tag(redis_prefix) + "secret", "not ours")
    for fail_open in (False, True):  # found at construction: a configuration error
        with pytest.raises(CacheUnavailable, match="does not hold a shmcache secret"):
            RedisSessionCache(redis_server.url, prefix=redis_prefix, fail_open=fail_open)
    redis_raw.delete(tag(redis_prefix) + "secret")
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix) as strict,
        RedisSessionCache(redis_server.url, prefix=redis_prefix, fail_open=True) as lenient,
    ):
        redis_raw.delete(tag(redis_prefix) + "fingerprint")
        redis_raw.rpush(tag(redis_prefix) + "fingerprint", "not ours")  # taken after start
        with pytest.raises(CacheUnavailable, match="does not hold a shmcache secret"):
            strict.get("tok")
        before = lenient.stats()["unavailable"]
        assert lenient.get("tok") is None
        assert lenient.stats()["unavailable"] == before + 1


# -- codecs: no forgeable pickle -----------------------------------------------------------


class _Payload:
    """A pickle that runs code when loaded (here: only sets a flag)."""

    def __reduce__(self) -> Any:
        return (exec, ("import builtins; builtins._shmcache_test_pwned = True",))


def test_a_redis_reader_cannot_make_get_run_code(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    """The attack of issue 13: without secret=, whoever reads Redis has the secret and can
    write a value with a valid MAC. With JSON as the default codec, a forged pickle is a
    miss, and nothing it carries runs."""
    with RedisSessionCache(redis_server.url, prefix=redis_prefix) as cache:
        cache.set("victim", {"user": "alice"}, 60)
        assert cache.get("victim") == {"user": "alice"}
        raw = redis_raw.get(tag(redis_prefix) + "secret")  # what a Redis reader sees
        full = tag(redis_prefix) + "s:" + cache.key_of("victim")
        forged = values.pack(derive(raw, shared=True), full, 0, bytes(16), pickle.dumps(_Payload()))
        redis_raw.set(full, forged, px=60000)
        assert cache.get("victim") is None
        assert not hasattr(builtins, "_shmcache_test_pwned")
        assert cache.stats()["decode_errors"] == 1


def test_pickle_needs_a_secret_of_ours(
    redis_server: _redis_support.RedisServer, redis_prefix: str
) -> None:
    for make in (
        lambda: RedisSessionCache(redis_server.url, prefix=redis_prefix, codec=PickleCodec()),
        lambda: open_cache(f"{redis_server.url}?prefix={redis_prefix}", codec=PickleCodec()),
    ):
        with pytest.raises(InvalidArgument, match="PickleCodec needs secret="):
            make()
    with RedisSessionCache(
        redis_server.url, prefix=redis_prefix, secret=SECRET, codec=PickleCodec()
    ) as cache:
        cache.set("tok", {1, 2}, 60)  # what only pickle can carry
        assert cache.get("tok") == {1, 2}


def test_default_codec_is_json_without_secret(
    redis_server: _redis_support.RedisServer, redis_raw: Any, redis_prefix: str
) -> None:
    with RedisSessionCache(redis_server.url, prefix=redis_prefix) as cache:
        cache.set("tok", {"user": "alice", "n": [1, 2]}, 60)
        raw = redis_raw.get(tag(redis_prefix) + "s:" + cache.key_of("tok"))
        assert raw.endswith(b'{"user":"alice","n":[1,2]}')
        with pytest.raises(InvalidType, match=r"JsonCodec.*secret="):
            cache.set("tok", {1, 2}, 60)  # not JSON: says why, and what to do
        assert cache.get("tok") == {"user": "alice", "n": [1, 2]}
    with RedisSessionCache(redis_server.url, prefix=redis_prefix + "x:", secret=SECRET) as fixed:
        fixed.set("tok", {1, 2}, 60)  # with secret=, pickle is the default
        assert fixed.get("tok") == {1, 2}


def test_undecodable_value_is_a_miss(
    redis_server: _redis_support.RedisServer, redis_prefix: str
) -> None:
    with (
        RedisSessionCache(redis_server.url, prefix=redis_prefix, secret=SECRET) as writer,
        RedisSessionCache(
            redis_server.url, prefix=redis_prefix, secret=SECRET, codec=JsonCodec()
        ) as reader,
    ):
        writer.set("tok", {1, 2}, 60)  # a set pickles; JSON cannot read it
        assert reader.get("tok") is None
        assert reader.stats()["decode_errors"] == 1
        assert writer.get("tok") == {1, 2}
