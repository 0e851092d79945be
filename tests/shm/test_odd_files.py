"""Whatever sits behind a name in /dev/shm, ``attach`` answers with a ``ShmCacheError`` that
says what it found (issue 12: a directory gave posix_ipc's bare ``ValueError``). Whatever
sits at ``sem.NAME``, where older versions kept a semaphore, changes nothing."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import posix_ipc
import pytest

from shmcache import (
    IncompatibleSegment,
    SegmentExists,
    SegmentPermissionError,
    SharedMemorySessionCache,
    ShmCacheError,
    open_cache,
)
from shmcache.shm import startup


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


@pytest.fixture
def paths(segment_name: str) -> Iterator[tuple[str, str]]:
    seg, sem = f"/dev/shm/{segment_name}", f"/dev/shm/sem.{segment_name}"
    yield seg, sem
    for path in (seg, sem):
        _remove(path)


def _unix_socket(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)


def _write(data: bytes) -> Callable[[str], None]:
    def make(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)

    return make


SEGMENTS: list[tuple[str, Callable[[str], None], type[ShmCacheError], str]] = [
    ("directory", os.mkdir, IncompatibleSegment, "is a directory"),
    ("fifo", os.mkfifo, IncompatibleSegment, "is a FIFO"),
    ("socket", _unix_socket, IncompatibleSegment, "is a socket"),
    ("empty", _write(b""), IncompatibleSegment, "0 bytes"),
    ("random", _write(os.urandom(8192)), IncompatibleSegment, "not a shmcache segment"),
    ("magic only", _write(b"SHMCACHE" + bytes(8192)), IncompatibleSegment, "layout version 0"),
    ("no header yet", _write(bytes(8192)), IncompatibleSegment, "not initialised"),
    ("symlink", lambda p: os.symlink("/etc/passwd", p), SegmentPermissionError, "symbolic link"),
    ("dangling symlink", lambda p: os.symlink("/nowhere", p), SegmentPermissionError,
     "symbolic link"),
]


@pytest.mark.parametrize(("make", "error", "message"), [s[1:] for s in SEGMENTS],
                         ids=[s[0] for s in SEGMENTS])
def test_odd_segment_files_are_refused_with_a_shmcache_error(
    paths: tuple[str, str], segment_name: str, make: Callable[[str], None],
    error: type[ShmCacheError], message: str,
) -> None:
    make(paths[0])
    with pytest.raises(error, match=message):
        SharedMemorySessionCache.attach(segment_name)
    assert os.path.lexists(paths[0])  # refused, not touched


def _old_semaphore(path: str) -> None:
    """A genuine POSIX semaphore, as shmcache before the mutex made one beside NAME."""
    assert path.startswith("/dev/shm/sem.")
    posix_ipc.Semaphore("/" + path[len("/dev/shm/sem."):], posix_ipc.O_CREX).close()


# What may sit at /dev/shm/sem.NAME, and whether removing the segment removes it too: only
# a semaphore of ours (an older shmcache's leftover) goes with it.
BESIDE: list[tuple[str, Callable[[str], None], bool]] = [
    ("nothing", lambda p: None, False),
    ("old semaphore", _old_semaphore, True),
    ("directory", os.mkdir, False),
    ("fifo", os.mkfifo, False),
    ("empty", _write(b""), False),
    ("random", _write(os.urandom(32 * 1024)), False),
    ("symlink", lambda p: os.symlink("/etc/passwd", p), False),
]


@pytest.mark.parametrize(("make", "removed"), [b[1:] for b in BESIDE], ids=[b[0] for b in BESIDE])
def test_whatever_sits_at_the_semaphore_name_changes_nothing(
    paths: tuple[str, str], segment_name: str, make: Callable[[str], None], removed: bool,
) -> None:
    """Create, create-or-attach, use and check work beside it (while shmcache still made a
    semaphore, ``attach`` refused every one of these but the old semaphore)."""
    make(paths[1])
    before = os.lstat(paths[1]) if os.path.lexists(paths[1]) else None
    with SharedMemorySessionCache.create(segment_name, capacity=64, value_size=64) as cache:
        cache.set("tok", {"n": 1}, 600)
        with startup.create_or_attach(segment_name, 64, 64) as other:
            assert other.get("tok") == {"n": 1}
            other.invalidate("tok")
        assert cache.get("tok") is None and cache.check() == []
        after = os.lstat(paths[1]) if os.path.lexists(paths[1]) else None
        assert (before and before.st_ino) == (after and after.st_ino)  # untouched so far
        cache.unlink()
    assert not os.path.lexists(paths[0])
    assert os.path.lexists(paths[1]) == (before is not None and not removed)


def test_create_or_attach_refuses_a_foreign_file_at_once(
    paths: tuple[str, str], segment_name: str
) -> None:
    """Only a segment being made is worth waiting for: a foreign file is the attach error
    itself, not a ``SegmentExists`` after the creation patience ran out."""
    _write(os.urandom(8192))(paths[0])
    with pytest.raises(IncompatibleSegment, match="not a shmcache segment"):
        startup.create_or_attach(segment_name, 64, 0)
    with pytest.raises(IncompatibleSegment, match="not a shmcache segment"):
        open_cache(f"shm://{segment_name}")


def test_a_half_made_segment_is_waited_for_then_reported(
    paths: tuple[str, str], segment_name: str
) -> None:
    """A creator that died after reserving the memory: waited for (it could be at work),
    then reported, and left in place for `shmcache unlink --force`."""
    _write(bytes(8192))(paths[0])
    with pytest.raises((IncompatibleSegment, SegmentExists)):
        startup.create_or_attach(segment_name, 64, 0, patience=0.05)
    with pytest.raises(IncompatibleSegment, match="not initialised"):
        startup.attach_when_ready(segment_name, patience=0.05)
    assert os.path.getsize(paths[0]) == 8192


def test_a_directory_is_never_removed_as_a_name(paths: tuple[str, str], segment_name: str) -> None:
    """gunicorn's master replaces a name it cannot share; a directory there is an error
    that names it, not posix_ipc's ``IsADirectoryError``, and the directory stays (and one
    at the old semaphore's name is none of its business)."""
    from shmcache.shm.segment import unlink_name

    seg, sem = paths
    os.mkdir(seg)
    with pytest.raises(IncompatibleSegment, match="is a directory"):
        unlink_name(segment_name, os.geteuid())
    assert os.path.isdir(seg)
    os.rmdir(seg)
    os.mkdir(sem)
    assert unlink_name(segment_name, os.geteuid()) is False
    assert os.path.isdir(sem)
