"""Leases on DatabaseSessionCache (issue 11, part 3; issue 14's "lease rule"): a validation
that raced a logout never puts the logged-out token back, on SQLite and PostgreSQL.

The rule, through the public API: if ``invalidate(token)`` (or ``invalidate_by_user`` of
its user, or ``clear``) returns in any process after ``get(token)`` returned None in some
thread and before that thread's next ``set(token, ...)``, that set is a miss everywhere; a
set with no miss before it (in its thread) is stored as always; a lease older than
``lease_timeout`` is void. The "other process" is a real one (``Host``), and the race is
provoked with events, never with sleeps that hope to land in the right order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import _workers
import psycopg
import pytest

from shmcache import DatabaseSessionCache, InvalidArgument, open_cache

from ._pg_support import Host, PostgresServer, session_user, tiered_pg

TIMEOUT = _workers.TIMEOUT
ALICE = {"user": "alice", "id": 1}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, pg_table: str) -> str:
    """A database URL with the test's own table (``open_cache`` form)."""
    if request.param == "sqlite":
        return f"{request.getfixturevalue('sqlite_file')}?table={pg_table}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return f"{server.url()}&table={pg_table}"


@pytest.fixture
def make(url: str) -> Iterator[Callable[..., Any]]:
    """Caches of this process on the test's table (closed after the test)."""
    made: list[Any] = []

    def make_(**options: Any) -> Any:
        made.append(open_cache(url, user_id_of=session_user, **options))
        return made[-1]

    yield make_
    for cache in made:
        cache.close()


@pytest.fixture
def other(url: str) -> Iterator[Host]:
    """Another process (another gunicorn worker) with its own cache on the same table."""
    host = Host(url, user_id_of=session_user)
    yield host
    host.stop()


# -- the rule, case by case ----------------------------------------------------------------


def test_a_logout_elsewhere_after_the_miss_keeps_the_set_out(
    make: Callable[..., Any], other: Host
) -> None:
    cache = make()
    assert cache.get("tok") is None  # the miss: the app validates against its database
    other("invalidate", "tok")  # the logout, handled by another worker, returns
    cache.set("tok", ALICE, 60)  # the validation that raced it
    assert cache.get("tok") is None and other("get", "tok") is None  # a miss everywhere
    assert cache.stats()["process_lease_drops"] == 1
    assert other("stats")["lease_drops"] == 1  # table-wide, seen from any process


def test_a_miss_with_no_logout_is_cached(make: Callable[..., Any], other: Host) -> None:
    cache = make()
    other("invalidate", "someone-else")  # other tokens' logouts do not matter
    other("invalidate_by_user", "bob")  # nor other users'
    assert cache.get("tok") is None
    cache.set("tok", ALICE, 60)
    assert cache.get("tok") == ALICE and other("get", "tok") == ALICE
    assert cache.stats()["lease_drops"] == 0


def test_a_set_with_no_miss_before_it_is_stored_as_always(
    make: Callable[..., Any], other: Host
) -> None:
    """A fresh login: no miss of the token in this thread, so no lease, whatever logouts
    happened (even of that very token, or a miss of it in another thread)."""
    cache = make()
    other("invalidate", "tok")
    other("invalidate_by_user", "alice")
    cache.set("tok", ALICE, 60)
    assert other("get", "tok") == ALICE
    missed = threading.Thread(target=cache.get, args=("tok2",))  # another thread's miss
    missed.start()
    missed.join(TIMEOUT)
    other("invalidate", "tok2")
    cache.set("tok2", ALICE, 60)
    assert cache.get("tok2") == ALICE and other("get", "tok2") == ALICE
    assert cache.stats()["lease_drops"] == 0


def test_invalidate_by_user_after_the_miss_keeps_the_set_out(
    make: Callable[..., Any], other: Host
) -> None:
    cache = make()
    other("set", "tok-phone", ALICE, 60)
    assert cache.get("tok") is None
    assert other("invalidate_by_user", "alice") == 1  # "log out all devices"
    cache.set("tok", ALICE, 60)  # filed under alice (user_id_of): refused
    assert cache.get("tok") is None and other("get", "tok") is None
    # Another user's validation after the same miss pattern is not touched.
    assert cache.get("tok-bob") is None
    cache.set("tok-bob", {"user": "bob"}, 60)
    assert other("get", "tok-bob") == {"user": "bob"}


def test_clear_after_the_miss_keeps_the_set_out(make: Callable[..., Any], other: Host) -> None:
    cache = make()
    assert cache.get("tok") is None
    other("clear")
    cache.set("tok", ALICE, 60)
    assert cache.get("tok") is None and other("get", "tok") is None
    assert cache.stats()["stamps"] == 0  # clear dropped every stamp: the floor covers them
    cache.set("tok", ALICE, 60)  # the get above missed after the clear: a good lease
    assert other("get", "tok") == ALICE


def test_a_dropped_set_also_removes_an_older_copy(
    make: Callable[..., Any], other: Host
) -> None:
    """Between the miss and the refused set someone cached the token again (a login with
    no miss before it): the refused set removes that copy too, so nothing older than
    the logout is served; it costs a validation."""
    cache = make()
    assert cache.get("tok") is None
    other("invalidate", "tok")
    other("set", "tok", {"user": "alice", "id": 0}, 60)
    cache.set("tok", ALICE, 60)
    assert other("get", "tok") is None and cache.get("tok") is None


def test_an_expired_lease_is_not_cached(url: str, clock: Any) -> None:
    with open_cache(url, clock=clock, lease_timeout=5) as cache:
        assert cache.stats()["lease_timeout"] == 5
        assert cache.get("tok") is None
        clock.advance(4.999)
        cache.set("tok", ALICE, 60)  # still valid: stored
        assert cache.get("tok") == ALICE
        cache.invalidate("tok")
        assert cache.get("tok") is None
        clock.advance(5)
        cache.set("tok", ALICE, 60)  # the miss is 5 s old: simply not cached
        assert cache.get("tok") is None
        assert (cache.stats()["process_lease_drops"], cache.stats()["lease_drops"]) == (1, 1)


def test_lease_timeout_is_an_option_and_a_url_parameter(url: str, pg_table: str) -> None:
    with open_cache(url + "&lease_timeout=2.5") as cache:
        assert cache.stats()["lease_timeout"] == 2.5
    with pytest.raises(InvalidArgument, match="lease_timeout"):
        open_cache(url + "&lease_timeout=0")
    base = url.partition("?")[0] if url.startswith("sqlite") else url.partition("&table")[0]
    for bad in (0, -1, float("nan"), "10"):
        with pytest.raises(InvalidArgument, match="lease_timeout"):
            DatabaseSessionCache(base, table=pg_table, lease_timeout=bad)


def test_lease_timeout_in_a_tiered_url_reaches_the_database_tier(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str]
) -> None:
    url = f"shm+{pg_server.url()}&table={pg_table}&shm={make_name()}&lease_timeout=3"
    with open_cache(url, subscribe=False) as cache:
        assert cache.remote.stats()["lease_timeout"] == 3


# -- the provoked race ---------------------------------------------------------------------


def test_provoked_race_a_validation_sleeps_while_the_logout_lands(
    make: Callable[..., Any], other: Host
) -> None:
    """The field incident (FIELD-NOTES 8): a request misses, reads the session row, and
    sleeps; meanwhile another worker logs the user out (invalidate, then the row is
    deleted); the request wakes and calls set. The logged-out token stays a miss."""
    cache = make()
    database = {"tok": ALICE}  # the app's sessions table
    read, logged_out = threading.Event(), threading.Event()
    accepted: list[Any] = []

    def request() -> None:  # the auth dependency
        session = cache.get("tok")
        if session is None:
            session = database.get("tok")  # validated: the row is still there
            read.set()
            logged_out.wait(TIMEOUT)  # "sleeps" until the logout has landed
            if session is not None:
                cache.set("tok", session, 10)
        accepted.append(session)

    thread = threading.Thread(target=request)
    thread.start()
    assert read.wait(TIMEOUT)
    other("invalidate", "tok")  # the logout, in another process
    del database["tok"]
    logged_out.set()
    thread.join(TIMEOUT)
    assert accepted == [ALICE]  # the racing request may use its session ...
    assert cache.get("tok") is None and other("get", "tok") is None  # ... no one keeps it
    assert database.get("tok") is None  # (and any later request fails validation)


def test_unrelated_logouts_cause_no_false_drops(make: Callable[..., Any], other: Host) -> None:
    """Validations of 4 threads while another process logs other tokens and users out:
    every one is cached (false drops are allowed, but this design has none here)."""
    cache = make(timeout=10)  # SQLite's busy timeout: a loaded machine is not an outage
    errors: list[str] = []
    go = threading.Barrier(5)

    def validations(w: int) -> None:
        try:
            go.wait(TIMEOUT)
            for i in range(40):
                tok = f"v-{w}-{i}"
                if cache.get(tok) is None:
                    cache.set(tok, {"user": f"u-{w}", "i": i}, 60)
                if cache.get(tok) != {"user": f"u-{w}", "i": i}:
                    errors.append(tok)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=validations, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    go.wait(TIMEOUT)
    for i in range(30):
        other("invalidate", f"gone-{i}")
        other("invalidate_by_user", f"gone-user-{i}")
    for t in threads:
        t.join(TIMEOUT)
    assert errors == [] and cache.stats()["lease_drops"] == 0


# -- the stamps: growth, reclaim, loss -----------------------------------------------------


def test_reclaimed_stamps_never_let_a_racing_set_through(url: str, clock: Any) -> None:
    """Stamps older than the lease timeout are reclaimed (the table stays small), and the
    floor rises with them: a lease taken before a reclaimed logout is void, not free."""
    # The lease clock is the fake one (the lease stays valid); stamps age on the
    # database's clock: a millisecond old is reclaimable with lease_timeout=0.001.
    with (
        open_cache(url, clock=clock, lease_timeout=0.001) as cache,
        open_cache(url, clock=clock) as logout,
    ):
        assert cache.get("tok") is None
        for i in range(50):
            logout.invalidate(f"other-{i}")
        logout.invalidate("tok")
        assert cache.stats()["stamps"] == 51
        time.sleep(0.01)  # let the database's clock pass the stamps' age (not a bound)
        cache.purge()
        assert cache.stats()["stamps"] == 0  # reclaimed ...
        cache.set("tok", ALICE, 60)
        assert logout.get("tok") is None  # ... and the logout still keeps the set out
        assert cache.get("tok") is None  # a lease after the reclaim:
        cache.set("tok", ALICE, 60)
        assert logout.get("tok") == ALICE  # no false drop


def test_stamps_are_reclaimed_as_sessions_are_written(url: str) -> None:
    from shmcache.sql.cache import RECLAIM_EVERY

    with open_cache(url, lease_timeout=0.001) as cache:
        for i in range(20):
            cache.invalidate(f"gone-{i}")
        assert cache.stats()["stamps"] == 20
        time.sleep(0.01)
        for i in range(RECLAIM_EVERY):
            cache.set(f"live-{i}", i, 60)
        assert cache.stats()["stamps"] == 0


def test_postgres_crash_voids_the_leases_it_lost(own_pg: PostgresServer, pg_table: str) -> None:
    """A crash empties the UNLOGGED stamps with the sessions: a lease taken before it may
    have lost its logout's stamp, so it is void; the stamps start again above it."""
    url = own_pg.url()
    with DatabaseSessionCache(url, table=pg_table) as cache:
        assert cache.get("tok") is None  # a lease before the crash
        own_pg.stop("immediate")
        own_pg.start()
        with DatabaseSessionCache(url, table=pg_table) as logout:
            logout.invalidate("tok")  # after the crash: its stamp starts above the lease
            assert logout.stats()["stamps"] == 1
        cache.set("tok", ALICE, 60)
        assert cache.get("tok") is None
        cache.set("tok", ALICE, 60)  # the lease of that get came after: cached
        assert cache.get("tok") == ALICE


def test_a_miss_the_database_did_not_answer_vouches_for_nothing(
    own_pg: PostgresServer, pg_table: str
) -> None:
    """With fail_open a get that could not reach the database is a miss: the set that
    follows it is dropped (a logout may have landed meanwhile, unseen)."""
    with DatabaseSessionCache(own_pg.url(), table=pg_table, fail_open=True) as cache:
        cache.set("warm", 1, 60)  # the tables exist
        own_pg.stop()
        assert cache.get("tok") is None and cache.stats()["unavailable"] >= 1
        own_pg.start()
        cache.set("tok", ALICE, 60)
        assert cache.get("tok") is None
        cache.set("tok", ALICE, 60)  # the lease of a get that was answered: cached
        assert cache.get("tok") == ALICE


# -- PostgreSQL: a logout that waits with its snapshot taken ---------------------------------


def _waiting(server: PostgresServer, needle: str) -> bool:
    rows = server.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE %s", (f"%{needle}%",),
    )
    return bool(rows[0][0])


def test_postgres_a_set_during_a_waiting_logout_is_refused(
    pg_server: PostgresServer, pg_table: str
) -> None:
    """Under READ COMMITTED a statement reads from the snapshot it started with: a logout
    that waits (here for the stamps' head row, as it would behind another logout) would
    not see a row that a set committed meanwhile, and a plain "NOT EXISTS a newer stamp"
    in the set would not see the logout's stamp yet: both commit and the logged-out token
    is a hit. The set is refused at once instead (it does not wait either)."""
    url = pg_server.url()
    with (
        DatabaseSessionCache(url, table=pg_table) as cache,
        DatabaseSessionCache(url, table=pg_table) as logout,
    ):
        assert cache.get("tok") is None
        blocker = psycopg.connect(url)
        try:
            blocker.execute(f"SELECT 1 FROM {pg_table}_stamps WHERE key = 'head' FOR UPDATE")
            done = threading.Thread(target=logout.invalidate, args=("tok",))
            done.start()
            deadline = time.monotonic() + TIMEOUT
            while not _waiting(pg_server, "_void_v1"):
                assert time.monotonic() < deadline, "the logout never waited"
                time.sleep(0.01)
            cache.set("tok", ALICE, 60)  # while the logout is running
        finally:
            blocker.rollback()
            blocker.close()
        done.join(TIMEOUT)
        assert not done.is_alive()
        assert cache.get("tok") is None and logout.get("tok") is None
        assert cache.stats()["process_lease_drops"] == 1


# -- shm+postgresql: the remote tier's side ------------------------------------------------


def test_tiered_postgres_a_logout_on_another_host_keeps_the_set_out(
    pg_server: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """Two hosts, each its segment in front of one table: host A misses, host B logs the
    token out, A's validation sets it. PostgreSQL refuses the set; A's own copy goes when
    B's notification lands (its local lease, or the message, drops it)."""
    with (
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as a,
        tiered_pg(pg_server, make_name(), clock, table=pg_table) as b,
    ):
        assert a.poll() == 0 and b.poll() == 0  # both listen
        assert a.get("tok") is None  # no copy on A, none in PostgreSQL
        b.invalidate("tok")
        a.set("tok", ALICE, 60)
        assert b.get("tok") is None  # not in PostgreSQL
        deadline = time.monotonic() + TIMEOUT
        while a.poll(0.05) == 0:  # B's notification reaches A
            assert time.monotonic() < deadline, "no notification"
        assert a.get("tok") is None and b.get("tok") is None
        assert a.remote.stats()["lease_drops"] == 1


# -- SQLite: what a logout makes durable ---------------------------------------------------


def test_sqlite_only_logouts_that_delete_a_row_wait_for_the_disk(
    sqlite_file: str, pg_table: str
) -> None:
    """A logout of a token with no row writes only its stamp (no fsync: a power cut ends
    every lease with its process); one that deletes a row commits with synchronous=FULL,
    even when the row appeared after it looked (it rolls back and runs again)."""
    import sqlite3

    path = sqlite_file[len("sqlite:///"):]
    trace: list[str] = []
    intruder: list[bytes] = []  # a key to insert just before the next BEGIN

    def traced(statement: str) -> None:
        trace.append(statement.split(" WHERE")[0])
        if statement.startswith("BEGIN") and intruder:
            with sqlite3.connect(path) as other:  # another writer, between look and lock
                other.execute(f"INSERT INTO {pg_table} SELECT ?, NULL, expires, value "
                              f"FROM {pg_table} LIMIT 1", (intruder.pop(),))

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.set_trace_callback(traced)
        return conn

    with DatabaseSessionCache(connect=connect, dialect="sqlite", table=pg_table) as cache:
        cache.set("tok", ALICE, 60)
        cache.set("model", ALICE, 60)

        def logout(token: str) -> list[str]:
            del trace[:]
            cache.invalidate(token)
            return [s for s in trace if s.startswith(("PRAGMA synchronous", "BEGIN",
                                                      "COMMIT", "ROLLBACK"))]

        normal = ["BEGIN IMMEDIATE", "COMMIT"]
        full = ["PRAGMA synchronous = FULL", "BEGIN IMMEDIATE", "COMMIT",
                "PRAGMA synchronous = NORMAL"]
        assert logout("absent") == normal
        assert logout("tok") == full and cache.get("tok") is None
        intruder.append(bytes.fromhex(cache.key_of("late")))
        assert logout("late") == ["BEGIN IMMEDIATE", "ROLLBACK", *full]
        assert cache.get("late") is None and cache.stats()["entries"] == 1


def test_a_tiered_miss_that_could_not_hash_the_token_is_a_void_lease(
    own_pg: PostgresServer, pg_table: str, make_name: Callable[[], str], clock: Any
) -> None:
    """PostgreSQL down from the start: the tier's get cannot even compute the token's key
    hash (the secret lives in the database) and, with fail_open, is a miss. The set after
    it, once the database is back, is not stored: nothing was known of the logouts then.
    (Before key_of voided the lease, this set was cached over the logout: checked.)"""
    with DatabaseSessionCache(own_pg.url(), table=pg_table) as setup:
        setup.set("warm", 1, 60)  # the tables and the secret exist
    own_pg.stop()
    with tiered_pg(own_pg, make_name(), clock, table=pg_table, fail_open=True) as cache:
        assert cache.get("tok") is None
        own_pg.start()
        remote = cache._remote
        for _ in range(300):  # the pool reconnects in the background: until it answers
            if remote.get("warm") == 1:
                break
            time.sleep(0.05)
        with DatabaseSessionCache(own_pg.url(), table=pg_table, clock=clock) as elsewhere:
            elsewhere.invalidate("tok")
            cache.set("tok", ALICE, 60)
            assert cache.get("tok") is None
            assert elsewhere.get("tok") is None
            cache.set("tok", ALICE, 60)  # the working miss just now: a real lease
            assert elsewhere.get("tok") == ALICE
