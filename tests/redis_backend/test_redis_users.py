"""The per-user index of ``RedisSessionCache`` (issue 6) against a real server: user ids
that never reach Redis, owners under the MAC, an index that stays small, exact counts, and
scripts that a restarted server forgot.
"""

from __future__ import annotations

from typing import Any

from _redis_support import TIMEOUT, eventually, keys_and_values

from shmcache import RedisSessionCache


def tag(prefix: str) -> str:
    """What every key of a cache with ``prefix`` starts with (its cluster hash tag)."""
    return "{" + prefix + "}"


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
