"""A real gunicorn, real HTTP, several workers: the reason this project exists.

Every test starts gunicorn on a free loopback port with ``shmcache.cli.demo._serve`` (the
same harness the demo uses) and talks to it with plain HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from shmcache import SharedMemorySessionCache
from shmcache.cli.demo import Server, logout_scenario, reset_scenario, serve

ROOT = Path(__file__).resolve().parents[2]  # the checkout: tests._asgi_app imports from it
WAIT = 60.0  # generous: turns a hang into a failure, never a speed requirement


def _gone(name: str) -> bool:
    """Nothing left in /dev/shm: no segment, and no semaphore (shmcache makes none now)."""
    return not os.path.lexists(f"/dev/shm/{name}") and not os.path.lexists(f"/dev/shm/sem.{name}")


def _wait_for(predicate, what: str, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_logout_in_one_worker_is_seen_by_all(preload: bool) -> None:
    with serve("shm", preload=preload) as server:
        result = logout_scenario(server)
        assert len(server.seen) == 4
        name = server.name
    assert result["workers_after_logout"] == 4  # every worker was asked after the logout
    assert result["accepted"] == 0
    assert _gone(name), "shutdown must leave nothing in /dev/shm"


def test_the_seed_cache_keeps_accepting_after_logout() -> None:
    """The same scenario on the seed's per-process cache shows the bug (so the test above
    could fail): the workers that did not handle the logout still accept the token."""
    with serve("memory") as server:
        result = logout_scenario(server)
    assert result["workers_after_logout"] == 4
    assert result["accepted"] > 0


def test_reset_from_the_cli_is_seen_by_running_workers() -> None:
    with serve("shm") as server:
        result = reset_scenario(server)
    assert result["cached_before_reset"] == result["users"]
    assert result["cached_after_reset"] == 0


def test_uvicorn_workers_share_logout() -> None:
    """FastAPI-style apps under gunicorn's uvicorn worker class: a Starlette app whose only
    session store is the shared cache (value mode): a login in one worker is valid in all,
    and a logout in one is seen by all."""
    env = {"PYTHONPATH": str(ROOT)}
    extra = "worker_class = 'uvicorn_worker.UvicornWorker'\n"
    with serve("shm", app="tests._asgi_app:app", extra_config=extra, env=env) as server:
        status, body = server.request("POST", "/login")
        assert status == 200
        token = body["token"]
        server.until_every_worker(token)  # 200 from every worker: set in one, hit in all
        status, _ = server.request("POST", "/logout", token)
        assert status == 200
        statuses = [server.request("GET", "/me", token)[0] for _ in range(40)]
        name = server.name
    assert statuses == [401] * 40
    assert len(server.seen) == 4
    assert _gone(name)


def _hold_lock(server: Server, token: str) -> None:
    with contextlib.suppress(OSError):  # the worker is killed under this request
        server.request("GET", "/test/hold-lock", token)


def test_worker_killed_holding_the_lock_is_recovered_by_child_exit() -> None:
    with serve("shm", env={"SHMCACHE_DEMO_TEST_HOOKS": "1"}) as server:
        observer = SharedMemorySessionCache.attach(server.name)
        try:
            threading.Thread(target=_hold_lock, args=(server, ""), daemon=True).start()
            _wait_for(lambda: observer.stats()["lock_owner"] is not None, "a worker to hold it")
            holder = observer.stats()["lock_owner"]
            assert observer.stats()["lock_owner_alive"]
            os.kill(holder, signal.SIGKILL)
            # No request is made until the lock is free again: only the master's child_exit
            # hook can have recovered it.
            _wait_for(lambda: observer.stats()["lock_recoveries"] == 1, "child_exit recovery")
            assert observer.stats()["lock_owner"] is None
            result = logout_scenario(server)  # and the server keeps serving, coherently
            assert result["accepted"] == 0
            assert observer.check() == []
        finally:
            observer.close()


def test_hup_reload_keeps_sessions() -> None:
    with serve("shm") as server:
        token = server.request("POST", "/login")[1]["token"]
        server.until_every_worker(token)
        old_workers = set(server.seen)
        os.kill(server.process.pid, signal.SIGHUP)

        def replaced() -> bool:  # eight answers in a row from workers born after the HUP
            answers = {server.request("GET", "/health")[1]["worker"] for _ in range(8)}
            return not answers & old_workers

        _wait_for(replaced, "new workers after HUP")
        # New workers, same segment: the session is still cached (value mode, so a worker
        # that never saw it reads it from shared memory).
        status, body = server.request("GET", "/me", token)
        assert status == 200 and body["cached"] is True
        assert body["worker"] not in old_workers
        name = server.name
    assert _gone(name)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_that_drop_privileges_keep_working(tmp_path: Path) -> None:
    extra = "user = 'nobody'\ngroup = 'nogroup'\n"
    # preload: the interpreter may live under /root, unreadable once the workers are
    # 'nobody', so everything the app needs is imported by the master before it forks.
    with serve("shm", extra_config=extra, preload=True) as server:
        os.chmod(server.workdir, 0o777)  # the demo's SQLite file, written by the workers
        result = logout_scenario(server)
        assert result["accepted"] == 0
        st = os.stat(f"/dev/shm/{server.name}")
        name = server.name
    assert result["warmup_requests"] >= 4
    assert st.st_uid != 0, "the master hands the segment to the workers' user"
    assert _gone(name)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("user", [None, "nobody"])
def test_binary_upgrade_usr2_shares_the_segment_and_leaves_no_name_behind(
    user: str | None,
) -> None:
    """USR2 starts a new master beside the old one (same app, same layout): it must share
    the segment, keep the sessions, survive the old master's exit, and clean up at its own.
    With ``user = 'nobody'`` the old master handed the segment (value mode, default pickle)
    to its workers' user: the new root master must still share it (before the fix its
    attach refused a segment it did not own, and gunicorn failed to start)."""
    if user is not None and os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")  # as the test above (CI runs as root)
    extra = "" if user is None else f"user = {user!r}\ngroup = 'nogroup'\n"
    with serve("shm", extra_config=extra, preload=user is not None) as server:
        if user is not None:
            os.chmod(server.workdir, 0o777)  # the demo's SQLite file, written by the workers
            assert os.stat(f"/dev/shm/{server.name}").st_uid != 0
        old_master = server.process.pid
        old_workers = set(_children(old_master))
        token = server.request("POST", "/login")[1]["token"]
        server.until_every_worker(token)
        os.kill(old_master, signal.SIGUSR2)
        found: list[int] = []

        def new_master_ready() -> bool:
            for pid in _children(old_master):
                if pid not in old_workers and len(_children(pid)) >= 4:
                    found.append(pid)
                    return True
            return False

        _wait_for(new_master_ready, "the new master and its workers")
        new_master = found[0]
        try:
            os.kill(old_master, signal.SIGTERM)  # retire the old generation
            server.process.wait(WAIT)
            assert os.path.exists(f"/dev/shm/{server.name}"), "old master must not unlink"

            def served_by_new_generation() -> bool:
                answers = {server.request("GET", "/health")[1]["worker"] for _ in range(8)}
                return answers <= set(_children(new_master))

            _wait_for(served_by_new_generation, "requests served by the new master's workers")
            status, body = server.request("GET", "/me", token)
            assert status == 200 and body["cached"] is True  # same segment, same sessions
            server.request("POST", "/logout", token)
            assert server.request("GET", "/me", token)[0] == 401
        finally:
            if _alive(new_master):
                os.kill(new_master, signal.SIGTERM)
            _wait_for(lambda: not _alive(new_master), "the new master to stop")
        name = server.name
    assert _gone(name)


def test_uvicorn_own_workers_attach_by_name(segment_name: str) -> None:
    """uvicorn --workers spawns (no fork, no master hook): get_cache() attaches by
    SHMCACHE_NAME, the first worker creating the segment."""
    import subprocess
    import sys

    from shmcache.cli.demo import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHMCACHE_NAME": segment_name,
           "SHMCACHE_VALUE_SIZE": "256", "SHMCACHE_CAPACITY": "1024"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests._asgi_app:app", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    server = Server(port, segment_name, proc, str(ROOT))
    try:
        def up() -> bool:
            try:
                server.request("GET", "/health")
                return True
            except OSError:
                return False

        _wait_for(up, "uvicorn to listen")
        token = server.request("POST", "/login")[1]["token"]
        server.until_every_worker(token, workers=2)
        server.request("POST", "/logout", token)
        statuses = [server.request("GET", "/me", token)[0] for _ in range(20)]
        assert statuses == [401] * 20
        assert len(server.seen) == 2
        with SharedMemorySessionCache.attach(segment_name) as observer:
            assert observer.value_size == 256
    finally:
        proc.terminate()
        proc.wait(WAIT)


def test_a_server_whose_workers_fail_to_boot_leaves_nothing_behind() -> None:
    """gunicorn halts without calling on_exit when workers cannot boot; the master's exit
    must still remove the names it created."""
    before = {n for n in os.listdir("/dev/shm") if "shmcache-demo-" in n}
    with pytest.raises(RuntimeError, match="gunicorn exited"), serve(
        "shm", app="shmcache_no_such_module:app"
    ):
        pass
    after = {n for n in os.listdir("/dev/shm") if "shmcache-demo-" in n}
    assert after <= before
