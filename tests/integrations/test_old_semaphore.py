"""A semaphore ``/dev/shm/sem.NAME`` left by an older shmcache confuses nothing.

Versions that locked with a POSIX semaphore made one beside every segment; since the
segment's own mutex (issue 10) nothing uses it, and shmcache no longer makes one. What is
left of those versions: ``attach`` refuses their segments by layout version, ``list`` never
shows their semaphores, and every removal of a name (``shmcache unlink``, ``--force``, a
gunicorn master replacing an old segment, the keeper's ``unlink``) removes a semaphore of
the same owner beside it, and nothing else that happens to be called ``sem.NAME``
(README, "Administration").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import _workers
import posix_ipc
import pytest

from shmcache import IncompatibleSegment, SharedMemorySessionCache
from shmcache import gunicorn as shm_gunicorn
from shmcache.cli.main import main
from shmcache.shm import startup

NOBODY = 65534


def seg(name: str) -> str:
    return f"/dev/shm/{name}"


def sem(name: str) -> str:
    return f"/dev/shm/sem.{name}"


def old_semaphore(name: str) -> None:
    """A genuine POSIX semaphore where an older shmcache made one."""
    posix_ipc.Semaphore("/" + name, posix_ipc.O_CREX).close()


def old_segment(name: str) -> None:
    """A segment of layout 2 (the last that locked with the semaphore) and its semaphore."""
    SharedMemorySessionCache.create(name, capacity=16).close()
    with open(seg(name), "r+b") as f:
        f.seek(8)
        f.write((2).to_bytes(4, "little"))  # the header's layout version
    old_semaphore(name)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = _workers.within(lambda: main(argv), timeout=60)
    out, err = capsys.readouterr()
    return status, out, err


def test_an_old_segment_is_refused_by_its_layout_version(segment_name: str) -> None:
    old_segment(segment_name)
    with pytest.raises(IncompatibleSegment, match="layout version 2"):
        SharedMemorySessionCache.attach(segment_name)
    # Not a segment being made: create-or-attach says so at once, and removes nothing.
    with pytest.raises(IncompatibleSegment, match="layout version 2"):
        startup.create_or_attach(segment_name, 16, 0, patience=30)
    assert os.path.exists(seg(segment_name)) and os.path.exists(sem(segment_name))


def test_unlink_removes_an_old_semaphore_with_the_segment(
    segment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole segment with an older version's semaphore beside it (its name reused): a
    plain ``unlink`` removes both, and says so."""
    old_semaphore(segment_name)
    SharedMemorySessionCache.create(segment_name, capacity=16).close()
    status, out, err = run(["unlink", segment_name], capsys)
    assert status == 0, err
    assert f"also removed {sem(segment_name)}" in out
    assert not os.path.lexists(seg(segment_name)) and not os.path.lexists(sem(segment_name))


@pytest.mark.parametrize("closed", [False, True], ids=["open", "closed"])
def test_the_keepers_unlink_removes_an_old_semaphore(segment_name: str, closed: bool) -> None:
    """What gunicorn's ``on_exit`` calls (``unlink_if_keeper``), and ``unlink`` after
    ``close``: the name goes, and an old semaphore with it."""
    old_semaphore(segment_name)
    cache = SharedMemorySessionCache.create(segment_name, capacity=16)
    if closed:
        cache.close()
        cache.unlink()
    else:
        assert cache.unlink_if_keeper()
        cache.close()
    assert not os.path.lexists(seg(segment_name)) and not os.path.lexists(sem(segment_name))


def test_an_old_semaphore_alone_needs_force(
    segment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old_semaphore(segment_name)
    status, out, err = run(["unlink", segment_name], capsys)
    assert status == 1 and out == ""
    assert "a semaphore left by an older shmcache" in err and "--force removes it" in err
    assert os.path.exists(sem(segment_name))
    status, out, err = run(["unlink", segment_name, "--force"], capsys)
    assert status == 0, err
    assert out == f"removed {sem(segment_name)}, a semaphore left by an older shmcache\n"
    assert not os.path.lexists(sem(segment_name))
    status, out, err = run(["unlink", segment_name, "--force"], capsys)
    assert status == 1 and "no shmcache segment named" in err  # nothing left to remove


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_a_segment_called_sem_dot_name_is_never_taken_for_a_semaphore(
    segment_name: str, force: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names may contain dots: ``sem.NAME`` can be a segment of its own. ``list`` shows it,
    and removing ``NAME`` leaves it whole (it is not a semaphore's size)."""
    other = "sem." + segment_name
    SharedMemorySessionCache.create(segment_name, capacity=16).close()
    try:
        SharedMemorySessionCache.create(other, capacity=16).close()
        status, out, err = run(["list", "--json"], capsys)
        assert status == 0, err
        names = [row["name"] for row in json.loads(out)]
        assert segment_name in names and other in names
        status, out, err = run(["unlink", segment_name, *(["--force"] if force else [])], capsys)
        assert status == 0, err
        assert "also removed" not in out
        assert not os.path.lexists(seg(segment_name))
        with SharedMemorySessionCache.attach(other) as cache:
            assert cache.check() == []
    finally:
        if os.path.lexists(seg(other)):
            os.unlink(seg(other))


def test_list_never_shows_an_old_semaphore(
    make_name: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    beside, alone = make_name(), make_name()
    old_semaphore(beside)
    SharedMemorySessionCache.create(beside, capacity=16).close()
    old_semaphore(alone)
    status, out, err = run(["list", "--json"], capsys)
    assert status == 0, err
    names = [row["name"] for row in json.loads(out)]
    assert names.count(beside) == 1
    assert not {"sem." + beside, "sem." + alone, alone} & set(names)
    status, out, err = run(["list"], capsys)
    assert status == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "OWNER", "MODE", "BYTES", "CAPACITY", "VALUE", "CREATOR"]
    assert [r.split()[0] for r in rows].count(beside) == 1
    assert not any(alone in r for r in rows)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")
def test_another_users_file_at_the_semaphore_name_stays(
    segment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    old_semaphore(segment_name)
    os.chown(sem(segment_name), NOBODY, NOBODY)
    SharedMemorySessionCache.create(segment_name, capacity=16).close()
    status, out, err = run(["unlink", segment_name, "--force"], capsys)
    assert status == 0, err
    assert "also removed" not in out and not os.path.lexists(seg(segment_name))
    assert os.stat(sem(segment_name)).st_uid == NOBODY  # not ours: left alone
    status, out, err = run(["unlink", segment_name, "--force"], capsys)
    assert status == 1 and "no shmcache segment named" in err


class _Arbiter:
    """What the gunicorn hooks read from the arbiter: ``cfg`` and ``log``."""

    class cfg:
        proc_name = "app"
        uid = os.geteuid()
        gid = os.getegid()

    log = logging.getLogger("test.arbiter")


def test_a_master_replacing_an_old_segment_removes_its_semaphore(
    segment_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gunicorn master of this version starting where an older one ran: the old segment
    is replaced (never shared), its semaphore goes with it, and shutdown leaves nothing."""
    old_segment(segment_name)
    monkeypatch.setattr(shm_gunicorn, "_settings", {})
    monkeypatch.setattr(shm_gunicorn, "_cache", None)
    monkeypatch.setenv(shm_gunicorn.ENV_NAME, segment_name)  # restored after the test
    shm_gunicorn.configure(name=segment_name, capacity=32, value_size=0)
    server: Any = _Arbiter()
    with caplog.at_level(logging.WARNING, logger="shmcache.gunicorn"):
        shm_gunicorn.on_starting(server)
    assert "replacing segment" in caplog.text and "layout version 2" in caplog.text
    assert not os.path.lexists(sem(segment_name))
    with SharedMemorySessionCache.attach(segment_name) as worker:
        assert worker.capacity == 32
        worker.set("tok", 1, 60)
        assert shm_gunicorn.get_cache().stats()["entries"] == 1  # the master's own object
        assert worker.check() == []
    shm_gunicorn.on_exit(server)
    assert not os.path.lexists(seg(segment_name)) and not os.path.lexists(sem(segment_name))
