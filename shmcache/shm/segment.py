"""The OS layer: a named POSIX shared-memory segment and its semaphore.

Knows names, permissions, owners and sizes; knows nothing of sessions or of the table.
The segment is ``/dev/shm/NAME`` and the semaphore ``/dev/shm/sem.NAME`` (glibc's naming),
so an admin finds both with ``ls /dev/shm``.

We use posix_ipc and not ``multiprocessing.shared_memory``: before Python 3.13 every process
that attaches to the latter registers the segment with its resource tracker, which unlinks
it when that process exits (an admin command that looked at a live segment deleted it).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import posix_ipc

from .._errors import (
    IncompatibleSegment,
    InvalidArgument,
    NoSpace,
    SegmentExists,
    SegmentNotFound,
    SegmentPermissionError,
)
from .layout import HEADER_SIZE, MAGIC, read_header

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def normalize_name(name: str) -> str:
    """``"myapp"`` or ``"/myapp"`` -> ``"myapp"``; refuse what cannot be a portable name."""
    if not isinstance(name, str):
        raise InvalidArgument(f"segment name must be a str, got {type(name).__name__}")
    bare = name[1:] if name.startswith("/") else name
    if not _NAME_RE.fullmatch(bare) or bare in (".", ".."):
        raise InvalidArgument(
            f"bad segment name {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . - "
            "(a leading slash is optional)"
        )
    return bare


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def semaphore_path(name: str) -> str:
    return os.path.join(SHM_DIR, "sem." + name)


@dataclass
class Segment:
    """An open segment: the mapping, the fd (kept for fstat and record locks) and the lock."""

    name: str
    shm: Any
    sem: Any
    mm: mmap.mmap
    inode: int

    @property
    def fd(self) -> int:
        return int(self.shm.fd)

    def close(self) -> None:
        self.mm.close()
        self.shm.close_fd()
        self.sem.close()

    def chown(self, uid: int, gid: int) -> None:
        """Hand both names to another user (a server that drops privileges after forking)."""
        os.fchown(self.fd, uid, gid)
        if os.path.exists(semaphore_path(self.name)):
            os.chown(semaphore_path(self.name), uid, gid)

    def unlink(self) -> None:
        """Remove both names, but only while they still name *this* segment: after a binary
        upgrade a new master may own a fresh segment under the same name."""
        try:
            ours = os.stat(segment_path(self.name)).st_ino == self.inode
        except FileNotFoundError:
            ours = True  # the segment's name is gone already: the semaphore is an orphan
        except OSError:
            ours = True  # no /dev/shm to look at (not Linux): trust the name
        if ours:
            _ignore_missing(posix_ipc.unlink_shared_memory, "/" + self.name)
            _ignore_missing(posix_ipc.unlink_semaphore, "/" + self.name)


def unlink_names(name: str) -> None:
    """Remove whatever exists of a segment's two names, by name alone (no inode check).
    A directory in their place is not ours to remove: ``IncompatibleSegment`` says so."""
    for fn, path in ((posix_ipc.unlink_shared_memory, segment_path(name)),
                     (posix_ipc.unlink_semaphore, semaphore_path(name))):
        try:
            _ignore_missing(fn, "/" + name)
        except IsADirectoryError:
            raise IncompatibleSegment(f"{path} is a directory: not removing it") from None


def _ignore_missing(fn: Callable[[str], None], name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        fn(name)


def create(name: str, size: int, mode: int, init: Callable[[mmap.mmap], None]) -> Segment:
    """Create both names exclusively, reserve the memory, run ``init``, then open the lock.

    The semaphore is created at 0, so nobody can take the lock before ``init`` has written
    the header (and ``init`` writes the magic last, so nobody can attach before that).
    """
    pname = "/" + name
    try:
        shm = posix_ipc.SharedMemory(pname, posix_ipc.O_CREX, mode=mode, size=0)
    except posix_ipc.ExistentialError:
        raise SegmentExists(f"shared memory segment {segment_path(name)} already exists") from None
    except posix_ipc.PermissionsError as exc:
        raise SegmentPermissionError(f"cannot create {segment_path(name)}: {exc}") from None
    sem = None
    try:
        os.fchmod(shm.fd, mode)  # the umask may only have narrowed it; make it exact
        os.ftruncate(shm.fd, size)
        _reserve(shm.fd, size, name)
        mm = mmap.mmap(shm.fd, size)
        try:
            sem = posix_ipc.Semaphore(pname, posix_ipc.O_CREX, mode=mode, initial_value=0)
        except posix_ipc.ExistentialError:
            raise SegmentExists(
                f"semaphore {semaphore_path(name)} already exists (left by a crash? "
                f"`shmcache unlink --force {name}` removes it)"
            ) from None
        if os.path.exists(semaphore_path(name)):
            os.chmod(semaphore_path(name), mode)
        init(mm)
        sem.release()
        inode = os.fstat(shm.fd).st_ino
    except BaseException:
        posix_ipc.unlink_shared_memory(pname)
        if sem is not None:
            sem.unlink()
            sem.close()
        shm.close_fd()
        raise
    return Segment(name, shm, sem, mm, inode)


def _reserve(fd: int, size: int, name: str) -> None:
    """Allocate every page now: a sparse segment on a full tmpfs gets SIGBUS on first touch,
    possibly hours later (Docker's default /dev/shm is 64 MB). PostgreSQL does the same."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise NoSpace(
                exc.errno,
                f"not enough shared memory for {name!r}: {size} bytes needed in {SHM_DIR} "
                f"({os.strerror(exc.errno)}); free some, or give the container a larger "
                "--shm-size",
            ) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def attach(name: str, *, owner_uid: int | None, allow_writable_by_others: bool) -> Segment:
    """Open an existing segment and semaphore, refusing ones we must not trust.

    Whatever is behind the name (a directory, a FIFO, an empty or foreign file, a symlink,
    half a pair of names), the answer is a ``ShmCacheError`` saying what was found, never
    an ``OSError`` or ``ValueError`` from posix_ipc: ``shmcache stats`` on a stray
    directory in /dev/shm once showed a traceback.
    """
    path = segment_path(name)
    _refuse_odd_file(path, "segment")  # before opening: shm_open of a directory is EINVAL
    shm = _open_existing(name)
    try:
        st = os.fstat(shm.fd)  # what we opened, whatever the path names by now
        _check_kind(st, path, "segment")
        _check_trust(st, path, owner_uid, allow_writable_by_others)
        _check_head(shm.fd, st.st_size, name)
        sem = _open_semaphore(name, owner_uid, allow_writable_by_others)
    except BaseException:
        shm.close_fd()
        raise
    try:
        mm = mmap.mmap(shm.fd, st.st_size)
    except BaseException:
        sem.close()
        shm.close_fd()
        raise
    return Segment(name, shm, sem, mm, st.st_ino)


def creation_state(name: str) -> str:
    """What a process that wants to create or attach ``name`` finds behind it.

    ``"missing"``: no segment (create it). ``"making"``: a segment whose memory or header is
    not there yet: ``create`` reserves the memory, then makes the semaphore, then writes the
    header with its magic last, so this is a creator at work (or one that died at it: the
    caller's patience decides). ``"other"``: anything else, which waiting will not change.
    """
    path = segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "other"
    if not stat.S_ISREG(st.st_mode):
        return "other"
    if st.st_size < HEADER_SIZE:
        return "making"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"  # its creator gave up and removed it
    except OSError:
        return "other"
    try:
        head = os.pread(fd, len(MAGIC), 0)
    finally:
        os.close(fd)
    return "making" if head == bytes(len(MAGIC)) else "other"


def _describe(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _refuse_odd_file(path: str, what: str) -> None:
    """Name the problem before posix_ipc turns it into a bare ``ValueError``/``OSError``."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # missing (opening says so), or no /dev/shm to look at (not Linux)
    if stat.S_ISLNK(st.st_mode):
        raise SegmentPermissionError(f"refusing {path}: it is a symbolic link")
    _check_kind(st, path, what)


def _check_kind(st: os.stat_result, path: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise IncompatibleSegment(
            f"{path} is {_describe(st.st_mode)}, not a shmcache {what}"
        )


def _open_existing(name: str) -> Any:
    path = segment_path(name)
    try:
        return posix_ipc.SharedMemory("/" + name)
    except posix_ipc.ExistentialError:
        raise SegmentNotFound(f"no shmcache segment named {name!r} ({path})") from None
    except posix_ipc.PermissionsError:
        raise SegmentPermissionError(
            f"no permission to open {path} (it belongs to another user?)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # shm_open uses O_NOFOLLOW: a planted symlink
            raise SegmentPermissionError(f"refusing {path}: it is a symbolic link") from None
        raise IncompatibleSegment(f"cannot open {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # posix_ipc's EINVAL: the name was swapped for a directory
        raise IncompatibleSegment(f"cannot open {path} as a segment: {exc}") from None


def _check_head(fd: int, size: int, name: str) -> None:
    """Validate the header before looking for the semaphore, so a foreign file is called
    foreign (not a segment "whose semaphore is missing"). Only the format's own check
    (``layout.read_header``) is used: this layer still knows nothing of the table."""
    try:
        read_header(os.pread(fd, HEADER_SIZE, 0), size)
    except IncompatibleSegment as exc:
        raise IncompatibleSegment(f"{segment_path(name)}: {exc}") from None


# What glibc's sem_open writes (sizeof(sem_t)): a shorter file would be mapped past its end,
# and the first sem_wait would die of SIGBUS.
_SEM_FILE_SIZE = 32 if sys.maxsize > 2**32 else 16


def _open_semaphore(name: str, owner_uid: int | None, allow_writable_by_others: bool) -> Any:
    path = semaphore_path(name)
    try:
        sem_st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        raise SegmentNotFound(
            f"segment {name!r} exists but its semaphore {path} does not (its creator is "
            "still making it, or died doing so)"
        ) from None
    except OSError:
        sem_st = None  # no /dev/shm/sem.* files on this platform
    if sem_st is not None:
        # Checked by path, then opened by name: /dev/shm is sticky, so once the name is
        # ours (as checked) nobody else can rename or replace it in between.
        if stat.S_ISLNK(sem_st.st_mode):
            raise SegmentPermissionError(f"refusing {path}: it is a symbolic link")
        _check_trust(sem_st, path, owner_uid, allow_writable_by_others)
        _check_kind(sem_st, path, "semaphore")
        if sys.platform.startswith("linux") and sem_st.st_size != _SEM_FILE_SIZE:
            raise IncompatibleSegment(
                f"{path} is {sem_st.st_size} bytes, not a semaphore ({_SEM_FILE_SIZE})"
            )
    try:
        return posix_ipc.Semaphore("/" + name)
    except posix_ipc.ExistentialError:
        raise SegmentNotFound(
            f"segment {name!r} exists but its semaphore {path} does not"
        ) from None
    except posix_ipc.PermissionsError:
        raise SegmentPermissionError(f"no permission to open semaphore {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentPermissionError(f"refusing {path}: it is a symbolic link") from None
        raise IncompatibleSegment(f"cannot open semaphore {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise IncompatibleSegment(f"cannot open semaphore {path}: {exc}") from None


# The way out of each refusal, in the words of the Python API; the command line shows its
# own flags instead (shmcache.cli.main replaces these exact texts).
OWNER_HINT = "pass owner_uid= to trust another owner"
WRITABLE_HINT = "pass allow_writable_by_others=True to accept"


def _check_trust(
    st: os.stat_result, path: str, owner_uid: int | None, allow_writable_by_others: bool
) -> None:
    expected = os.geteuid() if owner_uid is None else owner_uid
    if st.st_uid != expected:
        raise SegmentPermissionError(
            f"refusing {path}: owned by uid {st.st_uid}, expected uid {expected} "
            f"({OWNER_HINT})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not allow_writable_by_others:
        raise SegmentPermissionError(
            f"refusing {path}: mode {stat.S_IMODE(st.st_mode):o} lets group or others write "
            f"it ({WRITABLE_HINT})"
        )
