"""Security: exact owner-only modes, no raw token in shared memory, and refusal of segments
that another user could have planted or could write (/dev/shm is world-writable).

These tests need root (to chown files to another uid, as a squatter would own them); the
suite runs as root in CI. Without root they are reported as skipped, with the reason.
"""

from __future__ import annotations

import os
import pickle
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import posix_ipc
import pytest

from shmcache import (
    InvalidArgument,
    PickleCodec,
    SegmentExists,
    SegmentPermissionError,
    SharedMemorySessionCache,
    ShmCacheError,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


def seg_path(name: str) -> str:
    return f"/dev/shm/{name}"


def sem_path(name: str) -> str:
    return f"/dev/shm/sem.{name}"


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value_size", [0, 64])
def test_default_modes_are_owner_only_even_with_umask_0(segment_name: str, value_size: int) -> None:
    with umask(0):
        cache = SharedMemorySessionCache.create(segment_name, capacity=16, value_size=value_size)
    try:
        assert mode_of(seg_path(segment_name)) == 0o600
        assert os.stat(seg_path(segment_name)).st_uid == os.geteuid()
        assert not os.path.lexists(sem_path(segment_name))  # one name: no semaphore beside it
    finally:
        cache.close()


@pytest.mark.parametrize("mask", [0, 0o077, 0o022])
def test_explicit_mode_is_exact_whatever_the_umask(segment_name: str, mask: int) -> None:
    with umask(mask):
        cache = SharedMemorySessionCache.create(segment_name, capacity=16, mode=0o640)
    try:
        assert mode_of(seg_path(segment_name)) == 0o640
    finally:
        cache.close()


# -- no raw token in shared memory -----------------------------------------------------------


def _assert_absent(blob: bytes, secret: str) -> None:
    raw = secret.encode()
    assert raw not in blob
    # Nor any 12-character piece of it.
    for i in range(len(raw) - 11):
        assert raw[i : i + 12] not in blob, f"piece {raw[i : i + 12]!r} of the token found"


@pytest.mark.parametrize("value_size", [0, 128], ids=["hash", "value"])
def test_raw_token_never_reaches_the_segment(segment_name: str, value_size: int) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=value_size)
    other = SharedMemorySessionCache.attach(segment_name)
    try:
        tokens = [secrets.token_urlsafe(32) for _ in range(20)]
        assert all(len(t) == 43 for t in tokens)
        marker = "SESSION-MARKER-" + secrets.token_hex(8)
        for i, t in enumerate(tokens):
            cache.set(t, {"user_id": i, "marker": marker}, 600.0)
        assert other.get(tokens[0]) == ({"user_id": 0, "marker": marker} if value_size else None)
        for t in tokens[:5]:
            other.invalidate(t)
        for t in tokens[5:10]:
            other.get(t)
        blob = Path(seg_path(segment_name)).read_bytes()
        if value_size:
            assert marker.encode() in blob  # the reading works: stored values are there
        # The keyed tag is there, the token is not.
        tag = cache._table.tag_of(tokens[10].encode())[0]
        assert tag in blob
        for t in tokens:
            _assert_absent(blob, t)
    finally:
        other.close()
        cache.close()


def test_same_token_gets_unrelated_tags_in_two_segments(make_name: Callable[[], str]) -> None:
    """The tag is keyed by a per-segment secret: one segment's bytes say nothing about
    another's (no precomputed table of token hashes works)."""
    token = secrets.token_urlsafe(32)
    a = SharedMemorySessionCache.create(make_name(), capacity=16)
    b = SharedMemorySessionCache.create(make_name(), capacity=16)
    try:
        assert a._table.tag_of(token.encode())[0] != b._table.tag_of(token.encode())[0]
    finally:
        a.close()
        b.close()


# -- another owner ---------------------------------------------------------------------------


@needs_root
def test_segment_owned_by_another_uid_is_refused(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=16, value_size=64)
    cache.set("tok", {"token": "tok"}, 600.0)
    cache.close()
    os.chown(seg_path(segment_name), NOBODY, -1)
    with pytest.raises(SegmentPermissionError, match=f"uid {NOBODY}") as excinfo:
        SharedMemorySessionCache.attach(segment_name)
    assert isinstance(excinfo.value, ShmCacheError)
    assert isinstance(excinfo.value, PermissionError)
    # Trusting another owner's segment does not extend to unpickling what it wrote...
    with pytest.raises(InvalidArgument, match="unpickled"):
        SharedMemorySessionCache.attach(segment_name, owner_uid=NOBODY)
    # ...unless the caller names the codec itself.
    trusted = SharedMemorySessionCache.attach(segment_name, owner_uid=NOBODY, codec=PickleCodec())
    try:
        assert trusted.get("tok") == {"token": "tok"}
    finally:
        trusted.close()


@needs_root
def test_owner_uid_of_someone_else_refuses_our_own_segment(segment_name: str) -> None:
    SharedMemorySessionCache.create(segment_name, capacity=16).close()
    with pytest.raises(SegmentPermissionError):
        SharedMemorySessionCache.attach(segment_name, owner_uid=NOBODY)


# -- writable by others ----------------------------------------------------------------------


@pytest.mark.parametrize("seg_mode", [0o666, 0o620, 0o602, 0o622])
def test_segment_writable_by_others_is_refused_unless_allowed(
    segment_name: str, seg_mode: int
) -> None:
    SharedMemorySessionCache.create(segment_name, capacity=16).close()
    os.chmod(seg_path(segment_name), seg_mode)
    with pytest.raises(SegmentPermissionError, match="write"):
        SharedMemorySessionCache.attach(segment_name)
    allowed = SharedMemorySessionCache.attach(segment_name, allow_writable_by_others=True)
    try:
        allowed.set("tok", {"token": "tok"}, 600.0)
        assert allowed.check() == []
    finally:
        allowed.close()


def test_shared_mode_segment_pickles_with_its_permission(segment_name: str) -> None:
    """A segment created group-writable on purpose: its own pickled handle attaches."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=16, mode=0o660)
    try:
        with pytest.raises(SegmentPermissionError):
            SharedMemorySessionCache.attach(segment_name)
        clone = pickle.loads(pickle.dumps(cache))
        try:
            clone.set("tok", "s", 60.0)
        finally:
            clone.close()
    finally:
        cache.close()


# -- squatted names --------------------------------------------------------------------------


@needs_root
def test_create_refuses_a_squatted_segment_name_and_leaves_it_alone(segment_name: str) -> None:
    path = Path(seg_path(segment_name))
    path.write_bytes(b"squatter's data\n" * 100)
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o644)
    before = (path.read_bytes(), os.stat(path))
    with pytest.raises(FileExistsError) as excinfo:
        SharedMemorySessionCache.create(segment_name, capacity=16)
    assert isinstance(excinfo.value, ShmCacheError)
    assert isinstance(excinfo.value, SegmentExists)
    after = (path.read_bytes(), os.stat(path))
    assert after[0] == before[0]
    assert (after[1].st_uid, after[1].st_mode, after[1].st_size, after[1].st_ino) == (
        before[1].st_uid,
        before[1].st_mode,
        before[1].st_size,
        before[1].st_ino,
    )
    assert not os.path.lexists(sem_path(segment_name))  # nothing of ours left behind


@needs_root
def test_a_squatted_semaphore_name_neither_blocks_nor_is_touched(segment_name: str) -> None:
    """Another user's semaphore under ``sem.NAME`` (the name older versions used): the
    segment is made and used beside it, and even removing the segment leaves it alone."""
    squatter = posix_ipc.Semaphore("/" + segment_name, posix_ipc.O_CREX, initial_value=3)
    try:
        os.chown(sem_path(segment_name), NOBODY, NOBODY)
        before = os.stat(sem_path(segment_name))
        with SharedMemorySessionCache.create(segment_name, capacity=16, value_size=64) as cache:
            cache.set("tok", {"token": "tok"}, 600.0)
            with SharedMemorySessionCache.attach(segment_name) as other:
                assert other.get("tok") == {"token": "tok"}
            cache.unlink()
        assert not os.path.lexists(seg_path(segment_name))
        after = os.stat(sem_path(segment_name))
        assert (after.st_ino, after.st_mode, after.st_uid) == (
            before.st_ino, before.st_mode, before.st_uid
        )
        assert squatter.value == 3  # untouched
    finally:
        squatter.unlink()
        squatter.close()


def test_create_refuses_a_symlink_squat_and_never_touches_its_target(
    segment_name: str, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o644)
    link = seg_path(segment_name)
    os.symlink(victim, link)
    try:
        with pytest.raises(FileExistsError):
            SharedMemorySessionCache.create(segment_name, capacity=16)
        assert victim.read_bytes() == b"precious\n"
        assert mode_of(str(victim)) == 0o644
        assert os.path.islink(link)
        assert not os.path.lexists(sem_path(segment_name))
    finally:
        os.unlink(link)


def test_a_symlink_at_the_semaphore_name_is_never_followed(
    segment_name: str, tmp_path: Path
) -> None:
    """A link planted at ``sem.NAME``: create, attach and unlink work beside it, and neither
    the link nor its target (a file of a semaphore's size) is touched."""
    victim = tmp_path / "victim"
    victim.write_bytes(bytes(32))
    victim.chmod(0o644)
    os.symlink(victim, sem_path(segment_name))
    with SharedMemorySessionCache.create(segment_name, capacity=16) as cache:
        SharedMemorySessionCache.attach(segment_name).close()
        cache.unlink()
    assert os.path.islink(sem_path(segment_name))
    assert victim.read_bytes() == bytes(32) and mode_of(str(victim)) == 0o644


@needs_root
def test_attach_refuses_a_symlink_planted_by_another_user(
    segment_name: str, make_name: Callable[[], str]
) -> None:
    """Another user points /dev/shm/NAME at one of our genuine segments: we must not attach
    through it, and the refusal is a ShmCacheError like the others."""
    real = make_name()
    SharedMemorySessionCache.create(real, capacity=16).close()
    os.symlink(seg_path(real), seg_path(segment_name))
    os.lchown(seg_path(segment_name), NOBODY, NOBODY)
    try:
        with pytest.raises(ShmCacheError):
            SharedMemorySessionCache.attach(segment_name)
    finally:
        os.unlink(seg_path(segment_name))
