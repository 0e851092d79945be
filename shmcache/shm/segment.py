"""The OS layer: a named POSIX shared-memory segment.

Knows names, permissions, owners and sizes; knows nothing of sessions or of the table.
A segment is one name, ``/dev/shm/NAME``: its lock is a mutex inside it (``mutex.py``), so
there is no second object to create, check, hand to another user or remove.

Older versions also made a POSIX semaphore, ``/dev/shm/sem.NAME`` (the lock until layout 2,
unused since). Nothing here opens, checks or waits for one: a segment of layout 2 or older
is refused by its layout version, a later one is whole without it. Where shmcache removes a
segment's name it removes such a leftover too (:func:`unlink_name`), and it never mistakes
anything else for one: it is a file of ``sizeof(sem_t)`` bytes; a segment is never so small.

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


@dataclass
class Segment:
    """An open segment: the mapping and the fd (kept for fstat and fchown)."""

    name: str
    shm: Any
    mm: mmap.mmap
    inode: int

    @property
    def fd(self) -> int:
        return int(self.shm.fd)

    def close(self) -> None:
        self.mm.close()
        self.shm.close_fd()

    def reserve(self, offset: int, length: int) -> bool:
        """Allocate pages of the segment before their first touch (the value arena grows
        this way, see arena.py); False if /dev/shm has no room for them."""
        try:
            # posix_fallocate on tmpfs takes pages until it fails, then gives them back: a
            # doomed attempt would briefly leave /dev/shm full for everyone (a SIGBUS for a
            # process faulting a page then). Not attempted unless the room is there.
            vfs = os.fstatvfs(self.fd)
            if vfs.f_bavail * vfs.f_frsize < length:
                return False
        except OSError:
            pass  # no statvfs here: let posix_fallocate answer
        try:
            _reserve(self.fd, length, self.name, offset)
        except NoSpace:
            return False
        return True

    def chown(self, uid: int, gid: int) -> None:
        """Hand the segment to another user (a server that drops privileges after forking)."""
        os.fchown(self.fd, uid, gid)

    def unlink(self) -> None:
        """Remove the name (and an older version's semaphore beside it: :func:`unlink_name`),
        but only while it still names *this* segment: after a binary upgrade a new master may
        own a fresh segment under the same name."""
        try:
            st = os.stat(segment_path(self.name))  # by name: callable after close()
        except FileNotFoundError:
            return  # gone already
        except OSError:  # no /dev/shm to look at (not Linux): trust the name
            unlink_name(self.name, os.geteuid())
            return
        if st.st_ino == self.inode:
            unlink_name(self.name, st.st_uid)


def unlink_name(name: str, owner: int) -> bool:
    """Remove the segment's name, whatever it names (no inode check; gone already is fine),
    and a semaphore an older shmcache left beside it if ``owner`` owns it (True if there was
    one). A directory in the segment's place is not ours to remove: ``IncompatibleSegment``
    says so, and nothing is removed."""
    try:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory("/" + name)
    except IsADirectoryError:
        raise IncompatibleSegment(f"{segment_path(name)} is a directory: not removing it") from None
    return remove_legacy_semaphore(name, owner)


# sizeof(sem_t), what glibc's sem_open writes, on the 64-bit hosts shmcache runs on (the
# mutex's ABI check refuses others). A segment is at least HEADER_SIZE bytes: never this.
_SEM_FILE_SIZE = 32


def legacy_semaphore_path(name: str) -> str:
    """``/dev/shm/sem.NAME``: where shmcache before the mutex kept ``NAME``'s semaphore."""
    return os.path.join(SHM_DIR, "sem." + name)


def has_legacy_semaphore(name: str, uid: int) -> bool:
    """Whether ``sem.NAME`` is what an older shmcache left beside ``NAME``: a regular file
    of a semaphore's size owned by ``uid``. Anything else by that name (a segment named
    ``sem.NAME``, another user's file, a link, a directory) is not ours to touch."""
    try:
        st = os.lstat(legacy_semaphore_path(name))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == uid and st.st_size == _SEM_FILE_SIZE


def remove_legacy_semaphore(name: str, uid: int) -> bool:
    """Remove a semaphore an older shmcache left beside ``NAME`` (see
    :func:`has_legacy_semaphore`); True if there was one. Processes of that version that
    have it open keep it. /dev/shm is sticky: between the check and the unlink only ``uid``
    (or root) could replace the file."""
    if not has_legacy_semaphore(name, uid):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(legacy_semaphore_path(name))
    return True


def create(
    name: str, size: int, mode: int, init: Callable[[mmap.mmap], None], reserve: int | None = None
) -> Segment:
    """Create the name exclusively, reserve the memory (its first ``reserve`` bytes if
    given: the rest is reserved as it is used, :meth:`Segment.reserve`), then run ``init``.

    ``init`` initialises the lock and writes the header, the magic last: ``attach`` refuses
    a segment without its magic, so nobody can attach, let alone lock, before ``init`` is
    done (``creation_state`` calls such a segment "making").
    """
    pname = "/" + name
    try:
        shm = posix_ipc.SharedMemory(pname, posix_ipc.O_CREX, mode=mode, size=0)
    except posix_ipc.ExistentialError:
        raise SegmentExists(f"shared memory segment {segment_path(name)} already exists") from None
    except posix_ipc.PermissionsError as exc:
        raise SegmentPermissionError(f"cannot create {segment_path(name)}: {exc}") from None
    try:
        os.fchmod(shm.fd, mode)  # the umask may only have narrowed it; make it exact
        os.ftruncate(shm.fd, size)
        _reserve(shm.fd, size if reserve is None else reserve, name)
        mm = mmap.mmap(shm.fd, size)
        try:
            init(mm)
            inode = os.fstat(shm.fd).st_ino
        except BaseException:
            mm.close()
            raise
    except BaseException:
        posix_ipc.unlink_shared_memory(pname)  # O_EXCL made it ours; /dev/shm is sticky
        shm.close_fd()
        raise
    return Segment(name, shm, mm, inode)


def _reserve(fd: int, size: int, name: str, offset: int = 0) -> None:
    """Allocate every page now: a sparse segment on a full tmpfs gets SIGBUS on first touch,
    possibly hours later (Docker's default /dev/shm is 64 MB). PostgreSQL does the same."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, offset, size)
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
    """Open an existing segment, refusing one we must not trust.

    Whatever is behind the name (a directory, a FIFO, an empty or foreign file, a symlink,
    a header not finished), the answer is a ``ShmCacheError`` saying what was found, never
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
        mm = mmap.mmap(shm.fd, st.st_size)
    except BaseException:
        shm.close_fd()
        raise
    return Segment(name, shm, mm, st.st_ino)


def creation_state(name: str) -> str:
    """What a process that wants to create or attach ``name`` finds behind it.

    ``"missing"``: no segment (create it). ``"making"``: a segment whose memory or header is
    not there yet: ``create`` reserves the memory, then writes the header with its magic
    last, so this is a creator at work (or one that died at it: the caller's patience
    decides). ``"other"``: anything else, which waiting will not change.
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
    """Validate the header before mapping, so a foreign file, another layout version or a
    header not finished is named as such. Only the format's own check
    (``layout.read_header``) is used: this layer still knows nothing of the table."""
    try:
        read_header(os.pread(fd, HEADER_SIZE, 0), size)
    except IncompatibleSegment as exc:
        raise IncompatibleSegment(f"{segment_path(name)}: {exc}") from None


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
