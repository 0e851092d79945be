"""DatabaseSessionCache on SQLite and on a real PostgreSQL: what the database holds (no
token, MAC'd values, the secret), the pickle rule, expiry and reclaim, stats and check,
and bad input (a clear error, nothing changed)."""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from shmcache import (
    CacheClosed,
    DatabaseSessionCache,
    IncompatibleSegment,
    InvalidArgument,
    InvalidType,
    JsonCodec,
    PickleCodec,
    SecretMismatch,
    ShmCacheError,
)
from shmcache.sql import cache as sql_cache

from ._pg_support import PostgresServer

SECRET = b"database-test-secret-0123456789"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_file"))
    return request.getfixturevalue("pg_server").url()


@pytest.fixture
def make(url: str, pg_table: str, clock: Any) -> Iterator[Callable[..., DatabaseSessionCache]]:
    """Caches on the test's own table of ``url`` (all closed afterwards)."""
    made: list[DatabaseSessionCache] = []

    def make_(**options: Any) -> DatabaseSessionCache:
        options.setdefault("table", pg_table)
        options.setdefault("clock", clock)
        made.append(DatabaseSessionCache(url, **options))
        return made[-1]

    yield make_
    for cache in made:
        cache.close()


def sql(cache: DatabaseSessionCache, statement: str, *params: Any) -> list[Any]:
    """Run ``statement`` (``?`` placeholders) on the cache's own database."""
    if cache.dialect == "postgresql":
        statement = statement.replace("?", "%s")

    def run(conn: Any) -> list[Any]:
        cur = conn.execute(statement, params)
        return list(cur.fetchall()) if cur.description else []

    return list(cache._store.run(run))


def rows(cache: DatabaseSessionCache) -> list[tuple[bytes, bytes | None, int, bytes]]:
    return [tuple(bytes(x) if isinstance(x, memoryview) else x for x in row)
            for row in sql(cache, f"SELECT key, owner, expires, value FROM {cache.table} "
                                  "ORDER BY key")]


# -- what the database holds -------------------------------------------------------------


def test_tokens_and_user_ids_never_reach_the_database(
    make: Callable[..., DatabaseSessionCache],
) -> None:
    cache = make()
    token, user = "tok-Zq8pW2kLx9vB4nM7cR1tY6uE3oA5sD0fG", "alice@example.com"
    cache.set(token, {"user": "someone"}, 60, user_id=user)
    ((key, owner, _, _),) = rows(cache)
    assert len(key) == 16 and len(owner or b"") == 16
    assert key.hex() == cache.key_of(token)
    dump = repr(sql(cache, f"SELECT * FROM {cache.table}")) + repr(
        sql(cache, f"SELECT * FROM {cache.table}_meta"))
    for secret_text in (token, user):
        assert secret_text not in dump and secret_text.encode().hex() not in dump


@pytest.mark.parametrize("secret", [None, SECRET], ids=["shared-secret", "given-secret"])
def test_tampered_or_moved_values_are_misses(
    make: Callable[..., DatabaseSessionCache], secret: bytes | None
) -> None:
    cache = make(secret=secret)
    cache.set("a", {"n": 1}, 60, user_id="u")
    cache.set("b", {"n": 2}, 60, user_id="u")
    cache.set("c", {"n": 3}, 60)
    key_a, key_b, key_c = (bytes.fromhex(cache.key_of(t)) for t in "abc")
    (value_a,) = sql(cache, f"SELECT value FROM {cache.table} WHERE key = ?", key_a)[0]
    value_a = bytes(value_a)
    # a's value copied onto b's row: bound to a's key, so a miss for b
    sql(cache, f"UPDATE {cache.table} SET value = ? WHERE key = ?", value_a, key_b)
    # c moved to u's sessions: the MAC binds the owner too
    sql(cache, f"UPDATE {cache.table} SET owner = ? WHERE key = ?",
        bytes.fromhex(cache.cached_owner_of("u") or ""), key_c)
    flipped = value_a[:-1] + bytes([value_a[-1] ^ 1])
    sql(cache, f"UPDATE {cache.table} SET value = ? WHERE key = ?", flipped, key_a)
    before = cache.stats()["decode_errors"]
    assert [cache.get(t) for t in "abc"] == [None, None, None]
    assert cache.stats()["decode_errors"] == before + 3
    problems = cache.check()
    assert len(problems) == 1 and "3 rows fail" in problems[0]
    assert cache.purge() == 3  # damaged rows go with the expired ones
    assert cache.check() == []
    assert rows(cache) == []


def test_shared_secret_lives_in_the_meta_row(make: Callable[..., DatabaseSessionCache]) -> None:
    a, b = make(), make()
    a.set("tok", {"n": 1}, 60)
    assert b.get("tok") == {"n": 1}
    ((secret, fp),) = sql(a, f"SELECT secret, fingerprint FROM {a.table}_meta")
    assert len(bytes(secret)) == 32 and bytes(fp) == sql_cache.fingerprint(bytes(secret))
    assert a.stats()["shared_secret"] is True


def test_given_secret_stores_only_its_fingerprint(
    make: Callable[..., DatabaseSessionCache],
) -> None:
    a = make(secret=SECRET)
    a.set("tok", {"n": 1}, 60)
    ((secret, fp),) = sql(a, f"SELECT secret, fingerprint FROM {a.table}_meta")
    assert secret is None and bytes(fp) == sql_cache.fingerprint(SECRET)
    assert make(secret=SECRET.decode()).get("tok") == {"n": 1}  # str secrets: UTF-8
    other_secret = b"another-secret-0123456789"
    for other in (make(secret=other_secret), make(), make(secret=other_secret, fail_open=True)):
        with pytest.raises(SecretMismatch, match=repr(a.table)) as info:
            other.get("tok")  # loud, even with fail_open: a config error, not an outage
        assert isinstance(info.value, IncompatibleSegment)
        for secret in (SECRET, other_secret):  # named: the table; never a secret
            assert secret.decode() not in str(info.value)
            assert secret.hex() not in str(info.value)
        with pytest.raises(SecretMismatch, match="secret"):
            other.invalidate("tok")
        assert other.check() == [str(info.value)]
    assert a.get("tok") == {"n": 1}  # the refused clients changed nothing


def test_shared_secret_client_refused_by_a_given_secret_client(
    make: Callable[..., DatabaseSessionCache],
) -> None:
    make().set("tok", "s", 60)
    with pytest.raises(SecretMismatch, match="secret"):
        make(secret=SECRET).get("tok")


def test_lost_meta_row_means_a_new_secret_everywhere(
    make: Callable[..., DatabaseSessionCache],
) -> None:
    """Someone deletes the meta row (or drops the tables): every client notices at its next
    call, and they agree on the new secret; sessions under the old one are misses."""
    a, b = make(), make()
    told: list[int] = []
    if a.dialect == "postgresql":  # SQLite has no channel, so no tier to tell
        a.add_secret_listener(lambda: told.append(1))
    a.set("tok", "s", 60)
    assert b.get("tok") == "s"
    sql(a, f"DELETE FROM {a.table}_meta")
    assert a.get("tok") is None  # a makes the next secret
    assert a.dialect == "sqlite" or told
    b.set("tok2", "t", 60)
    assert a.get("tok2") == "t"  # b follows it: no split key space
    b.invalidate("tok2")
    assert a.get("tok2") is None
    sql(a, f"DROP TABLE {a.table}")
    sql(a, f"DROP TABLE {a.table}_meta")
    a.set("tok3", "u", 60)  # the tables are made again
    assert b.get("tok3") == "u"


# -- the pickle rule ---------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    id: int
    token: str


def test_default_codec_is_json_when_the_secret_is_in_the_database(
    make: Callable[..., DatabaseSessionCache], pg_table: str
) -> None:
    cache = make()
    cache.set("keep", {"n": 1}, 60)
    with pytest.raises(InvalidType, match="JsonCodec"):
        cache.set("tok", Session(1, "t"), 60)
    assert cache.get("tok") is None and len(rows(cache)) == 1  # nothing written
    with pytest.raises(InvalidArgument, match="PickleCodec needs secret="):
        make(codec=PickleCodec())
    # With a secret of its own (another table: one table, one secret), pickle by default.
    table = pg_table + "_fixed"
    fixed = make(secret=SECRET, table=table)
    fixed.set("tok", Session(1, "t"), 60)
    assert fixed.get("tok") == Session(1, "t")
    assert make(secret=SECRET, table=table, codec=PickleCodec()).get("tok") == Session(1, "t")
    json_reader = make(secret=SECRET, table=table, codec=JsonCodec())
    assert json_reader.get("tok") is None  # undecodable: a miss
    assert json_reader.stats()["decode_errors"] == 1


def test_forged_pickle_is_never_unpickled(make: Callable[..., DatabaseSessionCache]) -> None:
    """Whoever can write the table but lacks the secret writes values that fail the MAC."""
    cache = make(secret=SECRET)
    cache.set("tok", Session(1, "t"), 60)
    key = bytes.fromhex(cache.key_of("tok"))
    import pickle

    evil = pickle.dumps(Session(666, "forged"))
    sql(cache, f"UPDATE {cache.table} SET value = ? WHERE key = ?",
        b"\x01" + bytes(16) + evil, key)
    assert cache.get("tok") is None


# -- expiry, reclaim, purge --------------------------------------------------------------


def test_expiry_uses_the_database_clock_by_default(url: str, pg_table: str) -> None:
    with DatabaseSessionCache(url, table=pg_table) as cache:
        cache.set("tok", "s", 60)
        found = cache.lookup("tok")
        assert found is not None and 59 < found[1] <= 60
        ((expires,),) = sql(cache, f"SELECT expires FROM {cache.table}")
        # the database's wall clock, in ms since the epoch (not a monotonic clock)
        assert abs(expires - (time.time() * 1000 + 60_000)) < 600_000


def test_expired_rows_are_reclaimed_as_sessions_are_written(
    make: Callable[..., DatabaseSessionCache], clock: Any
) -> None:
    cache = make()
    for i in range(300):
        cache.set(f"short-{i}", i, 1)
    clock.advance(1)
    assert cache.stats()["expired"] == 300
    for i in range(sql_cache.RECLAIM_EVERY * 2):
        cache.set(f"live-{i}", i, 60)
    stats = cache.stats()
    assert stats["reclaimed"] == 300 and stats["expired"] == 0
    assert stats["entries"] == sql_cache.RECLAIM_EVERY * 2


def test_purge(make: Callable[..., DatabaseSessionCache], clock: Any) -> None:
    cache = make()
    for i in range(10):
        cache.set(f"short-{i}", i, 1, user_id="u")
    cache.set("long", "l", 100, user_id="u")
    clock.advance(1)
    assert (cache.stats()["entries"], cache.stats()["expired"]) == (1, 10)
    assert cache.purge() == 10
    assert (cache.stats()["entries"], cache.stats()["expired"]) == (1, 0)
    assert cache.purge() == 0
    assert cache.get("long") == "l"
    assert cache.stats()["users"] == 1
    assert cache.check() == []


def test_stats_fields(make: Callable[..., DatabaseSessionCache]) -> None:
    cache = make()
    cache.set("a", 1, 60, user_id=7)
    cache.get("a")
    cache.get("b")
    s = cache.stats()
    assert (s["backend"], s["dialect"], s["table"]) == ("database", cache.dialect, cache.table)
    assert (s["hits"], s["misses"], s["entries"], s["expired"], s["users"]) == (1, 1, 1, 0, 1)
    assert s["unavailable"] == 0 and s["decode_errors"] == 0 and s["fail_open"] is False
    if cache.dialect == "postgresql":
        assert s["unlogged"] is True
    else:
        assert s["journal_mode"] == "wal"


# -- dialect specifics -------------------------------------------------------------------


def test_sqlite_file_is_private_and_in_wal_mode(sqlite_file: str, pg_table: str) -> None:
    path = sqlite_file[len("sqlite:///"):]
    old = os.umask(0o022)
    try:
        with DatabaseSessionCache(sqlite_file, table=pg_table) as cache:
            cache.set("tok", "s", 60)
            for suffix in ("", "-wal", "-shm"):
                assert stat.S_IMODE(os.stat(path + suffix).st_mode) == 0o600, suffix
            assert cache.check() == []
            os.chmod(path, 0o644)
            problems = cache.check()
            assert len(problems) == 1 and "holds the shared secret" in problems[0]
        with DatabaseSessionCache(sqlite_file, table=pg_table + "_x", secret=SECRET) as fixed:
            fixed.set("tok", "s", 60)
            assert fixed.check() == []  # readable, but no secret in it
            os.chmod(path, 0o666)
            assert ["writable by group or others" in p for p in fixed.check()] == [True]
    finally:
        os.umask(old)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_postgres_table_is_unlogged_unless_asked(pg_server: PostgresServer, pg_table: str) -> None:
    for unlogged, persistence in ((True, "u"), (False, "p")):
        table = f"{pg_table}_{persistence}"
        with DatabaseSessionCache(pg_server.url(), table=table, unlogged=unlogged) as cache:
            cache.set("tok", "s", 60)
        kinds = dict(pg_server.sql(
            "SELECT relname, relpersistence FROM pg_class WHERE relname IN (%s, %s, %s)",
            (table, table + "_meta", table + "_stamps"),
        ))
        assert kinds == {  # the secret is logged; the leases' stamps go with the sessions
            table: persistence, table + "_meta": "p", table + "_stamps": persistence,
        }


def test_connect_callable(url: str, pg_table: str, clock: Any) -> None:
    if url.startswith("sqlite"):
        path = url[len("sqlite:///"):]
        cache = DatabaseSessionCache(
            connect=lambda: sqlite3.connect(path, check_same_thread=False), dialect="sqlite",
            table=pg_table, clock=clock,
        )
        wrong: Callable[[], Any] = lambda: psycopg  # noqa: E731
    else:
        cache = DatabaseSessionCache(
            connect=lambda: psycopg.connect(url), dialect="postgresql", table=pg_table,
            clock=clock,
        )
        wrong = lambda: sqlite3.connect(":memory:")  # noqa: E731
    with cache:
        cache.set("tok", "s", 60, user_id=1)
        with DatabaseSessionCache(url, table=pg_table, clock=clock) as by_url:
            assert by_url.get("tok") == "s"
            assert by_url.invalidate_by_user(1) == 1
        assert cache.get("tok") is None
    with (
        DatabaseSessionCache(connect=wrong, dialect=cache.dialect, table=pg_table) as bad,
        pytest.raises(InvalidType, match="connect= must return"),
    ):
        bad.get("tok")


# -- bad input ---------------------------------------------------------------------------


def _error(kind: type[Exception], fn: Callable[[], Any]) -> str:
    with pytest.raises(kind) as info:
        fn()
    assert isinstance(info.value, ShmCacheError)
    return str(info.value)


@pytest.mark.parametrize(
    ("options", "kind", "names"),
    [
        ({"table": "Sessions"}, InvalidArgument, "table"),
        ({"table": "1sessions"}, InvalidArgument, "table"),
        ({"table": "s; DROP TABLE x"}, InvalidArgument, "table"),
        ({"table": "x" * 49}, InvalidArgument, "table"),
        ({"table": ""}, InvalidArgument, "table"),
        ({"table": 7}, InvalidArgument, "table"),
        ({"timeout": 0}, InvalidArgument, "timeout"),
        ({"timeout": -1}, InvalidArgument, "timeout"),
        ({"timeout": math.nan}, InvalidArgument, "timeout"),
        ({"timeout": "1"}, InvalidArgument, "timeout"),
        ({"timeout": True}, InvalidArgument, "timeout"),
        ({"fail_open": 1}, InvalidArgument, "fail_open"),
        ({"unlogged": "no"}, InvalidArgument, "unlogged"),
        ({"user_id_of": "uid"}, InvalidType, "user_id_of"),
        ({"clock": 5}, InvalidType, "clock"),
        ({"codec": object()}, InvalidType, "codec"),
        ({"secret": b"short"}, InvalidArgument, "secret"),
        ({"secret": 12345678901234567890}, InvalidArgument, "secret"),
        ({"codec": PickleCodec()}, InvalidArgument, "PickleCodec"),
        ({"dialect": "mysql"}, InvalidArgument, "dialect"),
    ],
)
def test_bad_options(url: str, options: dict[str, Any], kind: type[Exception], names: str) -> None:
    assert names in _error(kind, lambda: DatabaseSessionCache(url, **options))


@pytest.mark.parametrize(
    ("args", "options", "kind", "names"),
    [
        ((), {}, InvalidArgument, "URL or connect="),
        (("sqlite:////tmp/x.db",), {"connect": sqlite3.connect}, InvalidArgument, "not both"),
        ((b"sqlite:////tmp/x.db",), {}, InvalidType, "str"),
        (("redis://localhost",), {}, InvalidArgument, "not a database URL"),
        (("sqlite://host/x.db",), {}, InvalidArgument, "no host"),
        (("sqlite://",), {}, InvalidArgument, "name a database file"),
        (("sqlite:///:memory:",), {}, InvalidArgument, "memory://"),
        (("sqlite:////tmp/x.db?table=t",), {}, InvalidArgument, "as arguments"),
        (("sqlite:////tmp/x.db",), {"dialect": "postgresql"}, InvalidArgument, "dialect"),
        ((), {"connect": "sqlite3"}, InvalidType, "callable"),
        ((), {"connect": sqlite3.connect}, InvalidArgument, "dialect="),
        (("postgresql://u:hunter2@/db?table=t",), {}, InvalidArgument, "'table'"),
        (("postgresql://u:hunter2@/db?nonsense=1",), {}, InvalidArgument, "nonsense"),
        (("postgres://u:hunter2@h:notaport/db",), {}, InvalidArgument, "port"),
    ],
)
def test_bad_connection_arguments(
    args: tuple[Any, ...], options: dict[str, Any], kind: type[Exception], names: str
) -> None:
    message = _error(kind, lambda: DatabaseSessionCache(*args, **options))
    assert names in message
    assert "hunter2" not in message  # passwords are masked


def test_bad_calls_change_nothing(make: Callable[..., DatabaseSessionCache]) -> None:
    cache = make()
    cache.set("keep", {"n": 1}, 60, user_id="u")
    before = rows(cache)
    for bad in (lambda: cache.set("keep", "x", 0), lambda: cache.set("keep", "x", math.inf),
                lambda: cache.set("", "x", 60), lambda: cache.set("keep", "x", "60"),
                lambda: cache.set("keep", "x", 60, user_id=1.5),
                lambda: cache.set("keep", {1, 2}, 60)):
        with pytest.raises((InvalidArgument, InvalidType)):
            bad()
    token: Any = b"keep"
    for call in (lambda: cache.get(token), lambda: cache.set(token, "x", 60),
                 lambda: cache.invalidate(token)):
        with pytest.raises(InvalidType):
            call()
    assert rows(cache) == before
    assert cache.get("") is None
    cache.invalidate("")  # no token, nothing to do
    assert cache.get("keep") == {"n": 1}


def test_use_after_close(make: Callable[..., DatabaseSessionCache]) -> None:
    cache = make()
    cache.set("tok", "s", 60)
    cache.close()
    cache.close()  # idempotent
    assert cache.closed
    for call in (lambda: cache.get("tok"), lambda: cache.set("tok", "s", 60),
                 lambda: cache.invalidate("tok"), lambda: cache.invalidate_by_user(1),
                 cache.clear, cache.stats, cache.check, cache.purge):
        with pytest.raises(CacheClosed):
            call()
    assert "closed" in repr(cache)
