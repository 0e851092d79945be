"""A real PostgreSQL server for the tests, SQLite files, their fixtures, and "hosts".

Nothing here is a test; conftest offers the fixtures to every module. The server binaries
come from ``$SHMCACHE_PG_BINDIR`` if set, else ``pg_ctl``'s directory on PATH, else the
newest ``/usr/lib/postgresql/*/bin``, else the ``pgserver`` wheel (in the ``test`` extra),
so a fresh machine runs every test. With none of them, a test that needs the server FAILS
saying how to install one: it never skips.

Each server is initdb'd into a temp dir, listens on a unix socket there only (no TCP
port), persists nothing on purpose (``fsync=off``), runs as ``nobody`` when the tests run
as root (PostgreSQL refuses root), and dies with the test process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import importlib.util
import itertools
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _workers
import pytest

from shmcache import DatabaseSessionCache, SharedMemorySessionCache, TieredSessionCache

START_TIMEOUT = 60.0  # generous: only turns a server that never comes up into a failure
MISSING = (
    "no PostgreSQL server binaries (initdb, postgres) found: install the test extra "
    "(pip install -e '.[test]', which brings the pgserver wheel with a PostgreSQL build), "
    "or the system's (apt-get install postgresql), or point SHMCACHE_PG_BINDIR at a bin "
    "directory"
)
NO_PSYCOPG = "psycopg 3 is not installed: pip install -e '.[test]' (or '.[postgresql]')"
PORT = 5432  # names the socket file only: the server listens on no TCP port


def require_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        pytest.fail(NO_PSYCOPG)


def _has_server(bindir: str) -> bool:
    return all(os.access(os.path.join(bindir, exe), os.X_OK) for exe in ("initdb", "postgres"))


def find_bindir() -> str | None:
    """The directory of the PostgreSQL server binaries the tests use (see the docstring)."""
    forced = os.environ.get("SHMCACHE_PG_BINDIR")
    if forced:
        return forced if _has_server(forced) else None
    candidates = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(os.path.dirname(os.path.realpath(pg_ctl)))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", path.split("/")[-2]))

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "pginstall" / "bin"))
    return next((c for c in candidates if _has_server(c)), None)


def _server_uid() -> int | None:
    """PostgreSQL refuses to run as root: as root, run it as ``nobody``."""
    if os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwnam("nobody").pw_uid


def _die_with_parent() -> None:
    # Runs after the uid change (which would clear it); the signal comes when the thread
    # that started the server ends: start servers from the main thread (fixtures do).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG; SIGINT: PostgreSQL's fast shutdown


class PostgresServer:
    """One postgres process on a unix socket; ``stop``/``start`` keep its data and socket
    path, so clients reconnect to the same URL."""

    def __init__(self) -> None:
        template = _template()
        self.bindir = template.bindir
        self.uid = template.uid
        self.dir = tempfile.mkdtemp(prefix="shmcache-pg-")
        self.data = os.path.join(self.dir, "data")
        if self.uid is not None:
            os.chown(self.dir, self.uid, -1)
        # A copy of one initdb per session (initdb takes seconds; a copy, a fraction).
        subprocess.run(["cp", "-a", template.data, self.data], check=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={self.dir}&port={PORT}"

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "postgres.log")

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-k", self.dir,
                 "-p", str(PORT), "-c", "listen_addresses=", "-c", "fsync=off",
                 "-c", "max_connections=200", "-c", "shared_buffers=16MB"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, user=self.uid,
                preexec_fn=_die_with_parent,
            )
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        with open(self.log, errors="replace") as f:
            tail = f.read()[-2000:]
        self.stop()
        raise RuntimeError(f"postgres did not start ({self.bindir}):\n{tail}")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clean shutdown (clients disconnected); ``immediate``: a crash (the
        next start runs recovery, which empties UNLOGGED tables)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot exit
        proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        try:
            proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(START_TIMEOUT)

    def sql(self, statement: str, params: Any = None) -> list[Any]:
        """Run one statement as the superuser (to look at or tamper with the tables)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return list(cur.fetchall()) if cur.description else []

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class _Template:
    """The session's one initdb, copied by every server."""

    def __init__(self) -> None:
        require_psycopg()
        bindir = find_bindir()
        if bindir is None:
            pytest.fail(MISSING)
        self.bindir = bindir
        self.uid = _server_uid()
        self.dir = tempfile.mkdtemp(prefix="shmcache-pg-template-")
        self.data = os.path.join(self.dir, "data")
        if self.uid is not None:
            os.chown(self.dir, self.uid, -1)
        subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", self.data, "-U", "postgres",
             "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True, capture_output=True, user=self.uid, timeout=START_TIMEOUT,
        )


_template_made: _Template | None = None
_shared: PostgresServer | None = None
_sqlite_dir: str | None = None
_tables = itertools.count()


def _template() -> _Template:
    global _template_made
    if _template_made is None:
        _template_made = _Template()
    return _template_made


def shared_server() -> PostgresServer:
    """One server for the whole session (started on first use, stopped at exit); tests
    that stop or crash a server make their own (``own_pg``)."""
    global _shared
    if _shared is None:
        server = PostgresServer()
        server.start()
        _shared = server
    return _shared


def sqlite_dir() -> str:
    global _sqlite_dir
    if _sqlite_dir is None:
        _sqlite_dir = tempfile.mkdtemp(prefix="shmcache-sqlite-")
    return _sqlite_dir


@atexit.register
def _cleanup() -> None:
    if _shared is not None:
        _shared.close()
    if _sqlite_dir is not None:
        shutil.rmtree(_sqlite_dir, ignore_errors=True)
    if _template_made is not None:
        shutil.rmtree(_template_made.dir, ignore_errors=True)


def table_name(make_name: Callable[[], str]) -> str:
    """A fresh table name (tests never see each other's rows)."""
    return make_name().replace("-", "_")[-40:].lstrip("0123456789") + f"_{next(_tables)}"


def sqlite_url(make_name: Callable[[], str]) -> str:
    return "sqlite:///" + os.path.join(sqlite_dir(), make_name() + ".db")


def sqlite_cache(clock: Any, make_name: Callable[[], str], **options: Any) -> Any:
    """A ``DatabaseSessionCache`` on a fresh SQLite file (contract suite factory)."""
    return DatabaseSessionCache(
        sqlite_url(make_name), table=table_name(make_name), clock=clock, **options
    )


def pg_cache(clock: Any, make_name: Callable[[], str], **options: Any) -> Any:
    """A ``DatabaseSessionCache`` on a fresh table of the shared server (contract suite).
    Its pool waits up to 5 s for a connection (the default is 1 s): on a 2-core machine
    running the whole suite, a new PostgreSQL backend can take longer than a second to
    start, and these tests are about the contract, not about timeouts."""
    options.setdefault("timeout", 5.0)
    return DatabaseSessionCache(
        shared_server().url(), table=table_name(make_name), clock=clock, **options
    )


def session_user(session: Any) -> Any:
    """``user_id_of`` for the hosts' sessions (importable under spawn, unlike a lambda)."""
    return session.get("user") if isinstance(session, dict) else None


def serve_host(url: str, options: dict[str, Any], conn: Any) -> None:
    """A "host" or worker: ``open_cache(url)`` in this process, then the commands sent
    over ``conn`` until ``("stop",)``."""
    from shmcache import open_cache

    cache: Any = open_cache(url, **options)
    try:
        _workers.answer_commands(cache, conn)
    finally:
        cache.close()


class Host(_workers.Remote):
    """A process of its own with its own cache (see ``serve_host``)."""

    def __init__(self, url: str, **options: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        super().__init__(ctx, serve_host, url, options, label="host")


def tiered_pg(
    server: PostgresServer,
    name: str,
    clock: Any,
    *,
    table: str,
    staleness: float = 5.0,
    subscribe: bool = False,
    fail_open: bool = False,
) -> TieredSessionCache:
    """One host's two-tier cache: its own segment ``name`` in front of the shared table."""
    return TieredSessionCache(
        SharedMemorySessionCache.create(name, capacity=64, value_size=256, clock=clock),
        DatabaseSessionCache(server.url(), table=table, clock=clock, fail_open=fail_open),
        max_staleness=staleness,
        subscribe=subscribe,
        clock=clock,
    )


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def pg_server() -> PostgresServer:
    return shared_server()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of the test's own, to stop, crash and restart."""
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def pg_table(make_name: Callable[[], str]) -> str:
    return table_name(make_name)


@pytest.fixture
def sqlite_file(make_name: Callable[[], str]) -> Iterator[str]:
    """A fresh SQLite database URL (the file and its -wal/-shm removed after the test)."""
    url = sqlite_url(make_name)
    yield url
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(url[len("sqlite:///"):] + suffix)
