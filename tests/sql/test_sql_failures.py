"""When the database is away: locked past the timeout, unreachable, stopped and restarted,
crashed. ``get`` is a miss with ``fail_open`` (counted), ``set`` drops (counted), and a
logout always raises ``CacheUnavailable`` rather than be reported done."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import _workers
import psycopg
import pytest

from shmcache import CacheUnavailable, DatabaseSessionCache

from ._pg_support import Host, PostgresServer

within = _workers.within  # fails, not hangs, a call that does not return


@pytest.fixture
def pair() -> Iterator[Any]:
    """``(make)``: caches closed after the test."""
    made: list[DatabaseSessionCache] = []

    def make(url: str, **options: Any) -> DatabaseSessionCache:
        made.append(DatabaseSessionCache(url, **options))
        return made[-1]

    yield make
    for cache in made:
        cache.close()


def _logouts_raise(cache: DatabaseSessionCache) -> None:
    for logout in (lambda: cache.invalidate("tok"), lambda: cache.invalidate_by_user("u"),
                   cache.clear):
        with pytest.raises(CacheUnavailable):
            within(logout)


def test_sqlite_locked_past_timeout(sqlite_file: str, pg_table: str, pair: Any) -> None:
    strict = pair(sqlite_file, table=pg_table, timeout=0.2)
    lenient = pair(sqlite_file, table=pg_table, timeout=0.2, fail_open=True)
    strict.set("tok", "s", 60, user_id="u")
    holder = sqlite3.connect(sqlite_file[len("sqlite:///"):], isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a writer that does not let go
    try:
        assert within(lambda: strict.get("tok")) == "s"  # WAL: readers never wait
        with pytest.raises(CacheUnavailable, match="locked"):
            within(lambda: strict.set("new", "n", 60))
        within(lambda: lenient.set("new", "n", 60))  # dropped, counted
        _logouts_raise(lenient)  # fail_open or not, a logout is never reported done
        assert lenient.stats()["unavailable"] == 4
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert strict.get("new") is None
    assert lenient.get("tok") == "s"
    lenient.invalidate("tok")
    assert strict.get("tok") is None


def test_sqlite_unreachable(tmp_path: Any, pg_table: str, pair: Any) -> None:
    url = f"sqlite:///{tmp_path}/no-such-dir/sessions.db"
    strict = pair(url, table=pg_table)
    lenient = pair(url, table=pg_table, fail_open=True)
    assert within(lambda: lenient.get("tok")) is None
    within(lambda: lenient.set("tok", "s", 60))
    with pytest.raises(CacheUnavailable, match="No such file"):
        within(lambda: strict.get("tok"))
    with pytest.raises(CacheUnavailable):
        within(lambda: strict.set("tok", "s", 60))
    _logouts_raise(lenient)
    stats = lenient.stats()
    assert stats["unavailable"] >= 5 and "error" in stats
    assert (stats["hits"], stats["misses"]) == (0, 1)
    (tmp_path / "no-such-dir").mkdir()  # the volume is back
    lenient.set("tok", "s", 60)
    assert strict.get("tok") == "s"


def test_postgres_locked_past_timeout(pg_server: PostgresServer, pg_table: str, pair: Any) -> None:
    url = pg_server.url()
    strict = pair(url, table=pg_table, timeout=0.3)
    lenient = pair(url, table=pg_table, timeout=0.3, fail_open=True)
    strict.set("tok", "s", 60, user_id="u")
    with psycopg.connect(url) as holder:
        holder.execute(f"LOCK TABLE {pg_table} IN ACCESS EXCLUSIVE MODE")  # until rollback
        with pytest.raises(CacheUnavailable, match="timeout"):
            within(lambda: strict.get("tok"))
        assert within(lambda: lenient.get("tok")) is None  # a miss, counted
        within(lambda: lenient.set("new", "n", 60))  # dropped, counted
        _logouts_raise(lenient)
        assert lenient.stats()["unavailable"] == 5
        holder.rollback()
    assert strict.get("tok") == "s"  # the connections that timed out are usable again
    assert lenient.get("new") is None
    lenient.invalidate("tok")
    assert strict.get("tok") is None


def test_postgres_stopped_and_restarted(own_pg: PostgresServer, pg_table: str, pair: Any) -> None:
    """A clean stop keeps the (unlogged) table; the caches fail while it is away, and work
    again as soon as it is back: pooled connections that died are replaced in the call."""
    url = own_pg.url()
    strict = pair(url, table=pg_table, timeout=0.5)
    lenient = pair(url, table=pg_table, timeout=0.5, fail_open=True)
    strict.set("tok", "s", 60, user_id="u")
    strict.set("tok2", "s2", 60)
    assert lenient.get("tok") == "s"
    worker = Host(f"{url}&table={pg_table}&fail_open=true&timeout=0.5")  # another process
    try:
        assert worker("get", "tok2") == "s2"
        own_pg.stop()
        with pytest.raises(CacheUnavailable):
            within(lambda: strict.get("tok"))
        assert within(lambda: lenient.get("tok")) is None
        within(lambda: lenient.set("new", "n", 60))
        _logouts_raise(lenient)
        assert worker("get", "tok2") is None  # fail-open in the other process too
        with pytest.raises(AssertionError, match="CacheUnavailable"):
            worker("invalidate", "tok2")
        own_pg.start()
        assert strict.get("tok") == "s"  # the first call after the restart works
        assert lenient.get("tok") == "s"
        assert worker("get", "tok2") == "s2"
        worker("invalidate", "tok2")
        assert strict.get("tok2") is None
        assert strict.get("new") is None  # what was set while it was away was dropped
        assert strict.invalidate_by_user("u") == 1
        assert lenient.get("tok") is None
    finally:
        worker.stop()
    assert strict.check() == []


def test_postgres_crash_empties_the_unlogged_table(
    own_pg: PostgresServer, pg_table: str, pair: Any
) -> None:
    """After a crash every user re-validates (nothing stale is served); the secret, in a
    logged table, survives, and so do the sessions of a table made with unlogged=False."""
    url = own_pg.url()
    unlogged = pair(url, table=pg_table)
    logged = pair(url, table=pg_table + "_logged", unlogged=False)
    for cache in (unlogged, logged):
        cache.set("tok", "s", 60)
    key = unlogged.key_of("tok")
    own_pg.stop("immediate")
    own_pg.start()
    assert unlogged.get("tok") is None
    assert unlogged.key_of("tok") == key  # same secret: hosts still agree on every key
    assert logged.get("tok") == "s"
    # The crash emptied the lease stamps too: the miss that found them gone cannot be
    # vouched for (a logout may have been lost with them), so its set is dropped; that
    # miss made them again, and the next validation is cached.
    unlogged.set("tok", "again", 60)
    assert unlogged.get("tok") is None and unlogged.stats()["lease_drops"] == 1
    unlogged.set("tok", "again", 60)
    assert unlogged.get("tok") == "again"
    assert unlogged.check() == [] and logged.check() == []
