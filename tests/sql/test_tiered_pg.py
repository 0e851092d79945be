"""``shm+postgresql://``: each host's shared-memory table in front of one PostgreSQL, logouts
pushed by LISTEN/NOTIFY (sent in the delete's transaction), and the same staleness bound S
as ``shm+redis://``, which holds with the listener killed."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import _workers
import pytest
from _redis_support import eventually

from shmcache import (
    CacheUnavailable,
    DatabaseSessionCache,
    InvalidArgument,
    SharedMemorySessionCache,
    TieredSessionCache,
    open_cache,
)

from ._pg_support import Host, PostgresServer, session_user, tiered_pg

TIMEOUT = _workers.TIMEOUT
within = _workers.within


def _kill_listeners(server: PostgresServer, table: str) -> int:
    """Terminate the server side of every LISTEN on the table's channel."""
    rows = server.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
        (f"LISTEN {table}_invalidations",),
    )
    return len(rows)


def test_two_hosts(pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str]) -> None:
    """S = 600 s: only the NOTIFY can make host B drop the copies it read."""
    base = (f"shm+{pg_server.url()}&table={pg_table}&capacity=1024&value_size=256"
            "&max_staleness=600")
    host_a, host_b = f"{base}&shm={make_name()}", f"{base}&shm={make_name()}"
    a = Host(host_a, user_id_of=session_user)
    b1, b2 = Host(host_b, user_id_of=session_user), Host(host_b, user_id_of=session_user)
    try:
        assert a("get", "warm-up") is None  # the secret exists before anyone copies
        for host in (a, b1, b2):
            assert host("wait_subscribed", TIMEOUT) is True
        a("set", "tok", {"user": "alice"}, 60)
        assert b1("get", "tok") == {"user": "alice"}  # from PostgreSQL, now in B's table
        assert b2("get", "tok") == {"user": "alice"}  # from B's table
        assert b2("stats")["local_hits"] == 1
        a("invalidate", "tok")
        assert a("get", "tok") is None
        eventually(lambda: b1("get", "tok") is None, "the logout on host B (worker 1)")
        eventually(lambda: b2("get", "tok") is None, "the logout on host B (worker 2)")
        a("set", "phone", {"user": "bob", "d": 1}, 60)
        a("set", "laptop", {"user": "bob", "d": 2}, 60)
        a("set", "carol", {"user": "carol"}, 60)
        for token in ("phone", "laptop", "carol"):
            assert b1("get", token) is not None
        assert a("invalidate_by_user", "bob") == 2
        eventually(lambda: b2("get", "phone") is None and b1("get", "laptop") is None,
                   "the revocation on host B")
        assert b2("get", "carol") == {"user": "carol"}
        b1("clear")
        eventually(lambda: a("get", "carol") is None, "the clear on host A")
    finally:
        for host in (a, b1, b2):
            host.stop()


def test_staleness_bound_without_messages(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """Nobody listening: B's copy of a logged-out session is trusted for S, not longer."""
    with (
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as a,
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as b,
    ):
        a.set("tok", "s", 60)
        a.set("u1", "s", 60, user_id=9)
        t0 = clock.now
        assert b.get("tok") == "s" and b.get("u1") == "s"
        a.invalidate("tok")
        assert a.invalidate_by_user(9) == 1
        assert (a.get("tok"), a.get("u1")) == (None, None)  # the logging-out host: at once
        clock.now = t0 + 4.999
        assert (b.get("tok"), b.get("u1")) == ("s", "s")  # what S allows, and no more
        clock.now = t0 + 5.0
        assert (b.get("tok"), b.get("u1")) == (None, None)
        assert b.stats()["remote_hits"] == 2


def test_listener_killed(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """B's LISTEN connection is terminated and the logout's NOTIFY is lost: the copy dies
    at S all the same, and B, subscribing again, drops every copy it made before."""
    with (
        tiered_pg(pg_server, make_name(), clock, table=pg_table, staleness=5) as a,
        tiered_pg(pg_server, make_name(), clock, table=pg_table, staleness=5) as b,
    ):
        assert b.poll() == 0  # subscribes
        a.set("tok", "s", 60)
        a.set("tok2", "s2", 60)
        t0 = clock.now
        assert b.get("tok") == "s" and b.get("tok2") == "s2"
        assert _kill_listeners(pg_server, pg_table) == 1
        a.invalidate("tok")  # its NOTIFY reaches nobody on B
        assert b.get("tok") == "s"
        clock.now = t0 + 4.999
        assert b.get("tok") == "s"
        with pytest.raises(CacheUnavailable):  # the dead connection shows: at the first
            for _ in range(20):  # read that sees the server's goodbye, or at the heartbeat
                b.poll(0.5)
        clock.now = t0 + 5.0
        assert b.get("tok") is None  # the bound, with no listener at all
        assert b.get("tok2") == "s2"  # a fresh copy (the old one died at S too)
        assert b.get("tok2") == "s2"
        hits = b.stats()
        assert b.poll() == 0  # subscribed again: copies made before may have missed news
        assert b.stats()["resubscribes"] == 2
        assert b.get("tok2") == "s2"  # so the copy is gone: read from PostgreSQL again
        after = b.stats()
        assert after["remote_hits"] == hits["remote_hits"] + 1
        assert after["local_hits"] == hits["local_hits"]


def test_listener_thread_comes_back(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    with (
        tiered_pg(pg_server, make_name(), clock, table=pg_table, staleness=600,
                  subscribe=True) as b,
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as a,
    ):
        assert b.wait_subscribed(TIMEOUT)
        a.set("tok", "s", 60)
        assert b.get("tok") == "s"
        assert _kill_listeners(pg_server, pg_table) == 1
        a.invalidate("tok")  # lost for B's listener; S is 600 s
        eventually(lambda: b.stats()["resubscribes"] >= 2, "the new subscription")
        assert b.get("tok") is None  # the resubscription emptied B's table
        a.set("tok", "s2", 60)
        assert b.get("tok") == "s2"
        a.invalidate("tok")
        eventually(lambda: b.get("tok") is None, "the logout through the new listener")


def test_fork_restarts_the_listener(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """gunicorn's preload: a forked worker listens on a connection of its own."""
    host_b = tiered_pg(pg_server, make_name(), clock, table=pg_table, staleness=600,
                       subscribe=True)
    assert host_b.wait_subscribed(TIMEOUT)
    ctx = multiprocessing.get_context("fork")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_workers.serve, args=(host_b, child), daemon=True)
    proc.start()
    child.close()

    def worker(cmd: str, *args: Any) -> Any:
        conn.send((cmd, *args))
        assert conn.poll(TIMEOUT), f"forked worker did not answer {cmd!r}"
        status, result = conn.recv()
        assert status == "ok", result
        return result

    try:
        host_b.close()  # the master's listener is gone: only the worker's can act
        assert worker("wait_subscribed", TIMEOUT) is True
        with tiered_pg(pg_server, make_name(), clock, table=pg_table) as host_a:
            host_a.set("tok", "s", 60)
            assert worker("get", "tok") == "s"
            host_a.invalidate("tok")
        eventually(lambda: worker("get", "tok") is None, "the logout in the forked worker")
        worker("stop")
    finally:
        proc.join(TIMEOUT)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0


def test_database_stopped(own_pg: PostgresServer, pg_table: str,
                          make_name: Callable[[], str], clock: Any) -> None:
    """PostgreSQL away: local copies serve for at most S, then a miss (fail_open) or an
    error; a logout raises, and still drops this host's copy."""
    with (
        tiered_pg(own_pg, make_name(), clock, table=pg_table, fail_open=True) as lenient,
        tiered_pg(own_pg, make_name(), clock, table=pg_table) as strict,
    ):
        for cache in (lenient, strict):
            cache.set("tok", "s", 60)
            cache.set("tok2", "s2", 60, user_id="u")
        t0 = clock.now
        own_pg.stop()
        clock.now = t0 + 4.999
        assert within(lambda: lenient.get("tok")) == "s"
        assert within(lambda: strict.get("tok")) == "s"
        with pytest.raises(CacheUnavailable):
            within(lambda: lenient.invalidate_by_user("u"))
        assert within(lambda: lenient.get("tok2")) is None  # the local copy went anyway
        with pytest.raises(CacheUnavailable):
            within(lambda: strict.invalidate("tok2"))
        with pytest.raises(CacheUnavailable):
            within(lambda: strict.get("tok2"))  # no local copy left: asks the database
        clock.now = t0 + 5.0
        assert within(lambda: lenient.get("tok")) is None
        own_pg.start()
        assert strict.get("tok") == "s"  # back: read again, copied again
        strict.invalidate("tok")
        assert lenient.get("tok") is None


def test_open_cache_url(pg_server: PostgresServer, pg_table: str, segment_name: str,
                        clock: Any) -> None:
    url = (f"shm+{pg_server.url()}&table={pg_table}&shm={segment_name}&capacity=128"
           "&value_size=512&max_staleness=2.5&subscribe=false&fail_open=true&timeout=3")
    with open_cache(url, clock=clock, user_id_of=session_user) as cache:
        assert isinstance(cache, TieredSessionCache)
        local, remote = cache._local, cache._remote
        assert isinstance(local, SharedMemorySessionCache)
        assert (local.capacity, local.value_size) == (128, 512)
        assert isinstance(remote, DatabaseSessionCache)
        assert (remote.table, remote.fail_open, remote._store.timeout) == (pg_table, True, 3)
        assert cache.stats()["max_staleness"] == 2.5 and not cache.stats()["subscribed"]
        cache.set("tok", {"user": "dave"}, 60)
        assert cache.invalidate_by_user("dave") == 1
    with pytest.raises(InvalidArgument, match="shm="):
        open_cache(f"shm+{pg_server.url()}&table={pg_table}")


def test_sqlite_cannot_be_a_remote_tier(sqlite_file: str, segment_name: str) -> None:
    remote = DatabaseSessionCache(sqlite_file)
    local = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=256)
    with local, remote, pytest.raises(InvalidArgument, match="shm\\+postgresql"):
        TieredSessionCache(local, remote)


def test_a_refused_set_leaves_no_local_copy(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """Leases end to end over PostgreSQL: host B misses, host A logs the token out, B's
    racing set is refused by the database, and B's own table does not keep the session
    either (the database's store raises LeaseDropped to the tier in front)."""
    with (
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as a,
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as b,
    ):
        assert b.get("tok") is None  # the miss: B's thread holds a lease
        a.invalidate("tok")  # the logout, on another host
        b.set("tok", "session", 60)  # the racing validation's set
        assert b.get("tok") is None and a.get("tok") is None
        assert b.stats()["lease_drops"] >= 1
        b.set("tok", "session", 60)  # a later login (no miss before it): cached
        assert b.get("tok") == "session"
