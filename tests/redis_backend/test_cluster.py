"""Redis Cluster: a real cluster of three primaries on loopback (the contract suite and the
revocation race run there too: tests/test_contract.py, tests/test_users.py).

What only a cluster has: every script in one hash slot (all keys of a cache share the tag
``{prefix}``), ``clear`` across nodes, resharding (MOVED, ASK, TRYAGAIN) followed by the
cache, WAIT on the node that owns the slot, and failures that are all ``CacheUnavailable``.
Tests that kill or reshard make their own cluster; the others share one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import _redis_topologies
import pytest
from _redis_support import TIMEOUT, eventually, within
from _redis_topologies import Cluster, Node
from redis.crc import key_slot

from shmcache import (
    CacheUnavailable,
    RedisSessionCache,
    ShmCacheError,
    TieredSessionCache,
    open_cache,
)


@pytest.fixture
def cluster() -> Cluster:
    return _redis_topologies.shared_cluster()


@pytest.fixture(scope="module")
def spare_cluster() -> Iterator[Cluster]:
    """A cluster of this module's own, with one replica (of the first primary), for tests
    that move slots around."""
    made = Cluster(replicas=1)
    yield made
    made.close()


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster for one test, which may kill its nodes."""
    made = Cluster()
    yield made
    made.close()


def slot_of(prefix: str) -> int:
    return int(key_slot(("{" + prefix + "}").encode()))


def prefix_on(cluster: Cluster, node: Node, base: str) -> str:
    """A prefix (``base`` + a number) whose hash slot ``node`` owns."""
    for i in range(1000):
        prefix = f"{base}{i}:"
        if cluster.owner_of(slot_of(prefix)) is node:
            return prefix
    raise AssertionError("no prefix found")


def keys_by_node(cluster: Cluster, prefix: str) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    for node in cluster.primaries:
        client = node.client()
        keys = list(client.scan_iter(match="{" + prefix + "}*"))
        client.close()
        if keys:
            found[node.port] = keys
    return found


# -- the cache on a cluster -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_cluster_urls(
    cluster: Cluster, redis_prefix: str, scheme: str, make_name: Callable[[], str]
) -> None:
    """``redis+cluster://`` (redis-py) and ``valkey+cluster://`` (valkey-py), plain and
    behind the host's segment."""
    url = f"{cluster.url(scheme)}?prefix={redis_prefix}"
    with open_cache(url) as cache:  # type: ignore[attr-defined]
        assert isinstance(cache, RedisSessionCache)
        for i in range(300):
            cache.set(f"alice-{i}", {"n": i}, 60, user_id="alice")
        cache.set("bob", {"n": -1}, 60, user_id="bob")
        assert cache.get("alice-7") == {"n": 7}
        cache.invalidate("alice-7")
        assert cache.get("alice-7") is None
        assert cache.invalidate_by_user("alice") == 299  # exact
        assert all(cache.get(f"alice-{i}") is None for i in (0, 150, 299))
        assert cache.get("bob") == {"n": -1}
        tiered = open_cache(f"shm+{url}&shm={make_name()}&capacity=64&value_size=256")
        with tiered:  # type: ignore[attr-defined]
            assert isinstance(tiered, TieredSessionCache)
            assert tiered.get("bob") == {"n": -1}
            cache.invalidate("bob")
            eventually(lambda: tiered.get("bob") is None, "the logout, through pub/sub")
        cache.set("x", 1, 60)
        cache.clear()
        assert cache.get("x") is None
        assert keys_by_node(cluster, redis_prefix).keys() <= {
            cluster.owner_of(slot_of(redis_prefix)).port
        }


@pytest.mark.parametrize("library", ["redis", "valkey"])
def test_cluster_client_objects(cluster: Cluster, redis_prefix: str, library: str) -> None:
    """A ``RedisCluster`` (redis-py) or ``ValkeyCluster`` (valkey-py) passed in."""
    module = importlib.import_module(f"{library}.cluster")
    make = getattr(module, "RedisCluster", None) or module.ValkeyCluster
    client = make(
        startup_nodes=[module.ClusterNode("127.0.0.1", cluster.primaries[0].port)],
        socket_timeout=TIMEOUT,
    )
    with RedisSessionCache(client, prefix=redis_prefix) as cache:
        for i in range(20):
            cache.set(f"t{i}", i, 60, user_id="u")
        assert [cache.get(f"t{i}") for i in (0, 19)] == [0, 19]
        assert cache.invalidate_by_user("u") == 20
        cache.set("t", "s", 60)
        cache.clear()
        assert cache.get("t") is None
    client.close()


def test_one_cache_one_slot(cluster: Cluster, make_name: Callable[[], str]) -> None:
    """Every key of one cache is in its prefix's slot (on one primary), so every script
    is a one-slot command; caches with other prefixes land elsewhere."""
    base = make_name()
    nodes_used = set()
    for i in range(12):
        prefix = f"{base}-{i}:"
        with RedisSessionCache(cluster.url(), prefix=prefix) as cache:
            for j in range(5):
                cache.set(f"t{j}", j, 60, user_id=f"user{j % 2}")
        found = keys_by_node(cluster, prefix)
        (port,) = found
        keys = found[port]
        assert port == cluster.owner_of(slot_of(prefix)).port
        # sessions, user indexes, secret and fingerprint, and the logout clock and clear
        # mark that the secret's creation made (it voids the leases of a lost secret)
        assert len(keys) == 5 + 2 + 2 + 2
        assert {key_slot(k) for k in keys} == {slot_of(prefix)}
        nodes_used.add(port)
    assert len(nodes_used) >= 2


def test_clear_across_nodes(cluster: Cluster, make_name: Callable[[], str]) -> None:
    base = make_name()
    a_prefix = prefix_on(cluster, cluster.primaries[0], base + "a")
    b_prefix = prefix_on(cluster, cluster.primaries[1], base + "b")
    with (
        RedisSessionCache(cluster.url(), prefix=a_prefix) as a,
        RedisSessionCache(cluster.url(), prefix=b_prefix) as b,
    ):
        for i in range(1500):  # more than one SCAN batch
            a.set(f"t{i}", i, 60, user_id=str(i % 7))
        b.set("t1", "b's", 60)
        a.clear()
        left = keys_by_node(cluster, a_prefix)[cluster.primaries[0].port]
        tag = ("{" + a_prefix + "}").encode()
        # the secret and its fingerprint stay, and so do the leases' clock and clear mark
        assert sorted(left) == [tag + name for name in (b"cleared", b"clock", b"fingerprint",
                                                        b"secret")]
        assert all(a.get(f"t{i}") is None for i in (0, 749, 1499))
        assert b.get("t1") == "b's"
        assert a.invalidate_by_user("3") == 0


# -- resharding ---------------------------------------------------------------------------------


def _migrate(source: Node, target: Node, slot: int, keys: list[bytes]) -> None:
    src, dst = source.client(), target.client()
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    if keys:
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    src.close()
    dst.close()


def _finish(nodes: list[Node], target: Node, slot: int) -> None:
    dst_id = target.client().execute_command("CLUSTER MYID")
    for node in nodes:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)


def test_resharding_is_followed(spare_cluster: Cluster, make_name: Callable[[], str]) -> None:
    """The slot of a live cache moves to another primary: keys half moved (TRYAGAIN: a
    clear error, not a hang), all moved but the slot not handed over (ASK), handed over
    (MOVED). The cache follows, with exact counts, and never returns a wrong answer."""
    source, target = spare_cluster.primaries[0], spare_cluster.primaries[1]
    prefix = prefix_on(spare_cluster, source, make_name())
    slot = slot_of(prefix)
    with RedisSessionCache(spare_cluster.url(), prefix=prefix, secret=b"s" * 16) as cache:
        for i in range(10):
            cache.set(f"t{i}", i, 60, user_id="u")
        (keys,) = keys_by_node(spare_cluster, prefix).values()
        sessions = [k for k in keys if b"}s:" in k]
        _migrate(source, target, slot, sessions[:5])  # half of them
        with pytest.raises(CacheUnavailable, match="TRYAGAIN") as info:
            within(lambda: cache.invalidate_by_user("u"))
        assert info.value.code == "TRYAGAIN"
        rest = [k for k in keys if k not in sessions[:5]]
        src = source.client()
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *rest)
        # Every key moved, the slot still the source's: the source answers ASK.
        assert [cache.get(f"t{i}") for i in range(10)] == list(range(10))
        cache.invalidate("t0")
        with pytest.raises(CacheUnavailable, match="TRYAGAIN"):  # a key not there yet:
            within(lambda: cache.set("new", "n", 60, user_id="u"))  # Redis says wait
        _finish(spare_cluster.primaries, target, slot)
        cache.set("new", "n", 60, user_id="u")  # MOVED: the map is read again
        assert cache.get("new") == "n" and cache.get("t0") is None
        assert cache.invalidate_by_user("u") == 10  # t1..t9 and new
        assert keys_by_node(spare_cluster, prefix).keys() == {target.port}


# -- failures -------------------------------------------------------------------------------------


def test_wait_goes_to_the_slots_primary(
    spare_cluster: Cluster, make_name: Callable[[], str]
) -> None:
    """min_replicas on a cluster: WAIT follows the script on the primary of the slot, so a
    primary with a replica acknowledges, and one without makes a logout raise."""
    with_replica = prefix_on(spare_cluster, spare_cluster.primaries[0], make_name())
    without = prefix_on(spare_cluster, spare_cluster.primaries[1], make_name())
    with RedisSessionCache(spare_cluster.url(), prefix=with_replica, min_replicas=1) as ok:
        ok.set("t", "s", 60, user_id="u")
        ok.invalidate("t")
        ok.set("t", "s", 60, user_id="u")
        assert ok.invalidate_by_user("u") == 1
        ok.clear()
    with RedisSessionCache(
        spare_cluster.url(), prefix=without, min_replicas=1, replica_timeout=0.1
    ) as lonely:
        lonely.set("t", "s", 60)
        for call in (lambda: lonely.invalidate("t"), lambda: lonely.invalidate_by_user("u"),
                     lonely.clear):
            with pytest.raises(CacheUnavailable, match="0 of the 1 replicas"):
                call()


def test_cluster_failures_are_cache_unavailable(
    own_cluster: Cluster, make_name: Callable[[], str]
) -> None:
    """A dead primary, a cluster down, a cluster unreachable from the start: every call
    raises CacheUnavailable (a ConnectionError), never the client library's own errors;
    fail_open turns reads into misses. The app can start while the cluster is down."""
    victim = own_cluster.primaries[2]
    prefix = prefix_on(own_cluster, victim, make_name())
    url = own_cluster.url()
    strict = RedisSessionCache(url, prefix=prefix, timeout=0.5)
    lenient = RedisSessionCache(url, prefix=prefix, timeout=0.5, fail_open=True)
    strict.set("t", "s", 60)
    victim.kill()
    calls: list[Callable[[], Any]] = [
        lambda: strict.get("t"),
        lambda: strict.set("t", "s", 60),
        lambda: strict.invalidate("t"),
        lambda: strict.invalidate_by_user("u"),
        strict.clear,
        lambda: lenient.invalidate("t"),
        lenient.clear,
    ]
    for call in calls:
        with pytest.raises(CacheUnavailable) as info:
            within(call)
        assert isinstance(info.value, ConnectionError) and isinstance(info.value, ShmCacheError)
    assert within(lambda: lenient.get("t")) is None
    within(lambda: lenient.set("t", "s", 60))
    assert lenient.stats()["unavailable"] >= 4
    strict.close()
    lenient.close()
    dead = f"redis+cluster://127.0.0.1:{victim.port}/"
    with RedisSessionCache(dead, prefix=prefix, timeout=0.5, fail_open=True) as late:
        assert within(lambda: late.get("t")) is None
        with pytest.raises(CacheUnavailable):
            within(lambda: late.invalidate("t"))
