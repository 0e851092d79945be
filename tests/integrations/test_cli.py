"""The admin command, run as a user would: in a subprocess, against live segments."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest

from shmcache import SharedMemorySessionCache

TOKEN = "cli-test-token-Zq8pW2kLx9vB4nM7cR1tY6uE3oA5sD0fG"


def shmcache(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmcache", *args],
        capture_output=True, text=True, timeout=60, input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("shmcache")


@pytest.fixture
def live(segment_name: str) -> Iterator[SharedMemorySessionCache]:
    cache = SharedMemorySessionCache.create(segment_name, capacity=256, value_size=128)
    cache.set(TOKEN, {"user": "alice", "secret": "payload-xyz"}, 600)
    cache.get(TOKEN)
    cache.get("missing")
    yield cache
    cache.close()


def test_stats_human_and_json(live: SharedMemorySessionCache) -> None:
    human = shmcache("stats", live.name)
    assert human.returncode == 0, human.stderr
    assert "capacity" in human.stdout and "256 sessions" in human.stdout
    data = json.loads(shmcache("stats", live.name, "--json").stdout)
    assert data["entries"] == 1
    assert data["capacity"] == 256
    assert data["hits"] >= 1 and data["misses"] >= 1  # published by the owning process
    for key in ("expired", "load_factor", "evictions", "lock_recoveries",
                "lock_owner", "creator_pid", "age_seconds"):
        assert key in data
    # Always 0 (a removal zeroes its slot): not shown, in either form (issue 12).
    assert "tombstones" not in data and "tombstones" not in human.stdout
    for out in (human.stdout, json.dumps(data)):
        assert TOKEN not in out and "payload-xyz" not in out


def test_stats_does_not_disturb_a_live_segment(live: SharedMemorySessionCache) -> None:
    before = os.stat(f"/dev/shm/{live.name}")
    for _ in range(3):
        assert shmcache("stats", live.name).returncode == 0
        assert shmcache("check", live.name).returncode == 0
    after = os.stat(f"/dev/shm/{live.name}")
    assert (before.st_ino, before.st_size) == (after.st_ino, after.st_size)
    assert live.get(TOKEN) == {"user": "alice", "secret": "payload-xyz"}
    assert live.check() == []
    other = SharedMemorySessionCache.attach(live.name)
    assert other.get(TOKEN) == {"user": "alice", "secret": "payload-xyz"}
    other.close()


def _holder(conn: Connection, name: str) -> None:
    cache = SharedMemorySessionCache.attach(name)
    conn.send(cache.get(TOKEN) is not None)
    conn.recv()  # wait for the reset
    conn.send(cache.get(TOKEN) is None)


def test_reset_is_seen_by_a_running_process(live: SharedMemorySessionCache) -> None:
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_holder, args=(child, live.name))
    proc.start()
    try:
        assert parent.poll(30) and parent.recv() is True  # the worker has the session
        result = shmcache("reset", live.name, "--yes")
        assert result.returncode == 0, result.stderr
        assert "dropped 1 live sessions" in result.stdout
        parent.send("go")
        assert parent.poll(30) and parent.recv() is True  # and sees it gone
    finally:
        proc.join(30)
    assert live.get(TOKEN) is None


def test_reset_needs_yes_without_a_terminal(live: SharedMemorySessionCache) -> None:
    result = shmcache("reset", live.name)
    assert_one_line_error(result)
    assert "--yes" in result.stderr
    assert live.get(TOKEN) is not None  # nothing dropped


def test_purge_check_and_unlock(live: SharedMemorySessionCache) -> None:
    purge = shmcache("purge", live.name)
    assert purge.returncode == 0 and "purged 0" in purge.stdout
    check = shmcache("check", live.name)
    assert check.returncode == 0 and "ok" in check.stdout
    unlock = shmcache("unlock", live.name)
    assert unlock.returncode == 0 and "free" in unlock.stdout


def test_check_exits_1_on_damage(live: SharedMemorySessionCache) -> None:
    # Flip a byte of the live entry's check word.
    table = live._table
    tag, home = table.tag_of(TOKEN.encode())
    slot = table.find(tag, home)
    table.words[table.check_word_index(slot)] ^= 0xFF
    result = shmcache("check", live.name)
    assert result.returncode == 1
    assert "slot" in result.stdout


def test_unlock_refuses_a_live_owner_and_recovers_a_dead_one(
    live: SharedMemorySessionCache,
) -> None:
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()

    def hold() -> None:
        live._lock.acquire()
        ready.set()
        release.wait(60)
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock

    proc = ctx.Process(target=hold)
    proc.start()
    try:
        assert ready.wait(30)
        refused = shmcache("unlock", live.name)
        assert_one_line_error(refused)
        assert "live process" in refused.stderr
        release.set()
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        recovered = shmcache("unlock", live.name)
        assert recovered.returncode == 0, recovered.stderr
        assert "recovered the lock from a dead holder" in recovered.stdout
    finally:
        release.set()
        proc.join(30)
    stats = live.stats()
    assert stats["lock_recoveries"] == 1 and stats["lock_owner"] is None
    live.set("after", 1, 60)  # the lock works again


def test_create_list_unlink(segment_name: str) -> None:
    created = shmcache("create", segment_name, "--capacity", "100", "--value-size", "64")
    assert created.returncode == 0, created.stderr
    assert oct(os.stat(f"/dev/shm/{segment_name}").st_mode & 0o777) == "0o600"
    listed = json.loads(shmcache("list", "--json").stdout)
    mine = [row for row in listed if row["name"] == segment_name]
    assert len(mine) == 1 and mine[0]["capacity"] == 100 and mine[0]["value_size"] == 64
    assert "semaphore" not in mine[0]  # one name per segment: nothing to report beside it
    assert segment_name in shmcache("list").stdout
    again = shmcache("create", segment_name, "--capacity", "100")
    assert_one_line_error(again)
    assert "exists" in again.stderr
    unlinked = shmcache("unlink", segment_name)
    assert unlinked.returncode == 0
    assert not os.path.exists(f"/dev/shm/{segment_name}")
    assert not os.path.exists(f"/dev/shm/sem.{segment_name}")


def test_unlink_refuses_a_file_that_is_not_a_segment(segment_name: str) -> None:
    path = f"/dev/shm/{segment_name}"
    with open(path, "wb") as f:
        f.write(b"somebody else's data")
    try:
        result = shmcache("unlink", segment_name)
        assert_one_line_error(result)
        assert os.path.exists(path)
    finally:
        os.unlink(path)


@pytest.mark.parametrize(
    "args",
    [
        ("stats", "no-such-segment-for-shmcache"),
        ("check", "bad/name"),
        ("reset", "no-such-segment-for-shmcache", "--yes"),
        ("unlock", "no-such-segment-for-shmcache"),
        ("unlink", "no-such-segment-for-shmcache"),
        ("purge", ""),
    ],
)
def test_errors_are_one_line_and_non_zero(args: tuple[str, ...]) -> None:
    assert_one_line_error(shmcache(*args))


def test_bad_arguments_exit_2_without_traceback(segment_name: str) -> None:
    for args in (("create", segment_name, "--capacity", "zero"),
                 ("create", segment_name, "--capacity", "10", "--mode", "999"),
                 ("frobnicate",), ()):
        result = shmcache(*args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
    assert not os.path.exists(f"/dev/shm/{segment_name}")


def test_a_foreign_segment_is_refused_unless_trusted(live: SharedMemorySessionCache) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a segment's owner needs root")
    os.chown(f"/dev/shm/{live.name}", 65534, 65534)
    refused = shmcache("stats", live.name)
    assert_one_line_error(refused)
    assert "owned by uid 65534" in refused.stderr
    trusted = shmcache("stats", live.name, "--owner", "65534")
    assert trusted.returncode == 0, trusted.stderr


def test_python_dash_m_and_console_script_agree() -> None:
    import shutil

    exe = shutil.which("shmcache")
    assert exe is not None, "pip install -e . installs the shmcache command"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == shmcache("--help").stdout


# -- revoke-user (issue 6) -------------------------------------------------------------------


def _user_holder(conn: Connection, name: str, tokens: list[str]) -> None:
    """A worker that set sessions of its own (hash mode: only it can read them back)."""
    cache = SharedMemorySessionCache.attach(name)
    for i, token in enumerate(tokens):
        cache.set(token, {"n": i}, 600, user_id=7 if i < 2 else "alice")
    conn.send([cache.get(t) is not None for t in tokens])
    conn.recv()  # wait for the revocation
    conn.send([cache.get(t) is not None for t in tokens])


@pytest.mark.parametrize("value_size", [0, 128], ids=["hash", "value"])
def test_revoke_user_is_seen_by_a_running_process(segment_name: str, value_size: int) -> None:
    tokens = [TOKEN + "-phone", TOKEN + "-laptop", TOKEN + "-alice"]
    with SharedMemorySessionCache.create(
        segment_name, capacity=256, value_size=value_size
    ) as owner:
        owner.set(TOKEN, "owner's", 600, user_id="7")  # "7" here, 7 in the worker: one user
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_user_holder, args=(child, segment_name, tokens))
        proc.start()
        try:
            assert parent.poll(30) and parent.recv() == [True, True, True]
            result = shmcache("revoke-user", segment_name, "7")
            assert result.returncode == 0, result.stderr
            assert "dropped 3 live sessions" in result.stdout
            for token in (TOKEN, *tokens):
                assert token not in result.stdout + result.stderr
            parent.send("go")
            assert parent.poll(30) and parent.recv() == [False, False, True]
        finally:
            proc.join(30)
        assert proc.exitcode == 0
        assert owner.get(TOKEN) is None
        again = shmcache("revoke-user", segment_name, "7")
        assert again.returncode == 0 and "dropped 0 live sessions" in again.stdout
        assert owner.check() == []


def test_revoke_user_errors(live: SharedMemorySessionCache) -> None:
    assert_one_line_error(shmcache("revoke-user", "no-such-segment-for-shmcache", "7"))
    assert_one_line_error(shmcache("revoke-user", live.name, ""))
    missing = shmcache("revoke-user", live.name)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert live.get(TOKEN) is not None  # nothing dropped
