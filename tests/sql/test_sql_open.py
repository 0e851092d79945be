"""``open_cache`` with database URLs, and the ``shmcache`` command on them (run as a user
would, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shmcache import (
    DatabaseSessionCache,
    InvalidArgument,
    JsonCodec,
    ShmCacheError,
    open_cache,
)

from ._pg_support import PostgresServer

TOKEN = "cli-test-token-Zq8pW2kLx9vB4nM7cR1tY6uE3oA5sD0fG"
SECRET = "cli-test-secret-0123456789abcdef"


@pytest.fixture
def opened() -> Iterator[Callable[..., Any]]:
    caches: list[Any] = []

    def open_(url: str, **options: Any) -> Any:
        caches.append(open_cache(url, **options))
        return caches[-1]

    yield open_
    for cache in caches:
        cache.close()


def test_sqlite_url(opened: Callable[..., Any], sqlite_file: str, pg_table: str,
                    clock: Any) -> None:
    cache = opened(f"{sqlite_file}?table={pg_table}&timeout=2.5&fail_open=true",
                   clock=clock, codec=JsonCodec(), user_id_of=lambda s: s["u"])
    assert isinstance(cache, DatabaseSessionCache)
    assert (cache.dialect, cache.table, cache.fail_open) == ("sqlite", pg_table, True)
    assert cache._store.timeout == 2.5
    cache.set("tok", {"u": 1}, 1)
    assert cache.invalidate_by_user(1) == 1  # user_id_of reached it
    cache.set("tok", {"u": 1}, 1)
    clock.advance(1)
    assert cache.get("tok") is None  # and the clock
    upper = opened(sqlite_file.replace("sqlite", "SQLITE", 1) + f"?table={pg_table}")
    assert upper.dialect == "sqlite"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_url(opened: Callable[..., Any], pg_server: PostgresServer, pg_table: str,
                      scheme: str) -> None:
    url = pg_server.url().replace("postgresql", scheme, 1)
    cache = opened(f"{url}&table={pg_table}&unlogged=false&application_name=myapp-x")
    assert isinstance(cache, DatabaseSessionCache)
    assert (cache.dialect, cache.table) == ("postgresql", pg_table)
    cache.set("tok", "s", 60)
    assert cache.stats()["unlogged"] is False
    names = pg_server.sql("SELECT application_name FROM pg_stat_activity")
    assert ("myapp-x",) in names  # libpq's own parameters reach libpq


@pytest.mark.parametrize(
    ("url", "options", "names"),
    [
        ("sqlite:////tmp/x.db?capacity=1", {}, "capacity"),
        ("sqlite:////tmp/x.db?unlogged=false", {}, "unlogged"),  # PostgreSQL only
        ("sqlite:////tmp/x.db?table=a&table=b", {}, "twice"),
        ("sqlite:////tmp/x.db?fail_open=maybe", {}, "fail_open"),
        ("sqlite:////tmp/x.db?timeout=soon", {}, "timeout"),
        ("sqlite:////tmp/x.db", {"prefix": "x"}, "prefix"),
        ("sqlite:////tmp/x.db#frag", {}, "fragment"),
        ("postgresql://u:hunter2@/db?host=/tmp&nonsense=1", {}, "nonsense"),
        ("postgresql://u:hunter2@/db?host=/tmp&unlogged=perhaps", {}, "unlogged"),
        ("postgresql://u:hunter2@/db", {"capacity": 8}, "capacity"),
        ("shm+postgresql://u:hunter2@/db?host=/tmp", {}, "shm="),
        ("shm+postgresql://u:hunter2@/db?shm=x&prefix=p", {}, "prefix"),
    ],
)
def test_bad_urls(url: str, options: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        open_cache(url, **options)
    assert isinstance(info.value, ShmCacheError) and isinstance(info.value, ValueError)
    assert names in str(info.value) and "hunter2" not in str(info.value)


# -- the admin command ---------------------------------------------------------------------


def shmcache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcache", *args], capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("shmcache")
    return result.stderr


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, pg_table: str) -> str:
    if request.param == "sqlite":
        return f"{request.getfixturevalue('sqlite_file')}?table={pg_table}"
    return f"{request.getfixturevalue('pg_server').url()}&table={pg_table}"


def test_admin_commands(db_url: str, opened: Callable[..., Any]) -> None:
    cache = opened(db_url)
    cache.set(TOKEN, {"user": "alice", "secret": "payload-xyz"}, 600, user_id=7)
    cache.set("other", {"user": "bob"}, 600, user_id=8)
    assert cache.get("raced") is None
    cache.invalidate("gone")
    shmcache("revoke-user", db_url, "nobody")  # (another process)
    cache.set("raced", {"user": "carol"}, 600, user_id="nobody")  # refused: a lease drop
    human = shmcache("stats", db_url)
    assert human.returncode == 0, human.stderr
    assert "2 live" in human.stdout and cache.table in human.stdout
    assert "1 sets refused" in human.stdout and "2 logout stamps" in human.stdout
    data = json.loads(shmcache("stats", db_url, "--json").stdout)
    assert (data["entries"], data["expired"], data["users"]) == (2, 0, 2)
    assert (data["lease_drops"], data["stamps"]) == (1, 2)
    assert shmcache("check", db_url).returncode == 0
    revoked = shmcache("revoke-user", db_url, "7")
    assert revoked.returncode == 0 and "dropped 1 live sessions" in revoked.stdout
    assert cache.get(TOKEN) is None and cache.get("other") == {"user": "bob"}
    # a damaged row: check says so (exit 1), purge removes it
    table = cache.table
    mark = "?" if cache.dialect == "sqlite" else "%s"
    cache._store.run(lambda conn: conn.execute(f"UPDATE {table} SET value = {mark}", (b"0",)))
    checked = shmcache("check", db_url)
    assert checked.returncode == 1 and "1 rows fail" in checked.stdout
    purged = shmcache("purge", db_url)
    assert purged.returncode == 0 and "purged 1 " in purged.stdout
    assert shmcache("check", db_url).returncode == 0
    cache.set("again", {"user": "carol"}, 600)
    refused = shmcache("reset", db_url)  # no terminal, no --yes
    assert "--yes" in one_line_error(refused)
    assert refused.returncode == 2 and cache.get("again") is not None
    reset = shmcache("reset", db_url, "--yes")
    assert reset.returncode == 0 and "dropped 1 live sessions" in reset.stdout
    assert cache.get("again") is None
    everything = human.stdout + data.__repr__() + revoked.stdout + checked.stdout
    assert TOKEN not in everything and "payload-xyz" not in everything
    assert "hunter2" not in everything


def test_admin_errors(db_url: str, tmp_path: Any) -> None:
    assert "segment name" in one_line_error(shmcache("unlock", db_url))
    assert "--owner" in one_line_error(shmcache("stats", db_url, "--owner", "0"))
    assert "database URL" in one_line_error(shmcache("stats", "redis://localhost:6379/0"))
    gone = f"sqlite:///{tmp_path}/missing/x.db"
    assert "No such file" in one_line_error(shmcache("purge", gone))
    masked = one_line_error(shmcache("stats", "postgresql://u:hunter2@/db?host=/nonexistent"))
    assert "hunter2" not in masked and "PoolTimeout" in masked


def test_admin_with_a_given_secret(db_url: str, opened: Callable[..., Any]) -> None:
    cache = opened(db_url, secret=SECRET)
    cache.set(TOKEN, "s", 600, user_id=7)
    missing = one_line_error(shmcache("revoke-user", db_url, "7"))
    assert "secret" in missing and "SHMCACHE_SECRET" in missing
    wrong = one_line_error(shmcache("revoke-user", db_url, "7", env={"SHMCACHE_SECRET": "x" * 32}))
    assert "another fingerprint" in wrong and repr(cache.table) in wrong and "x" * 32 not in wrong
    assert cache.get(TOKEN) == "s"
    done = shmcache("revoke-user", db_url, "7", env={"SHMCACHE_SECRET": SECRET})
    assert done.returncode == 0 and "dropped 1" in done.stdout
    assert cache.get(TOKEN) is None
