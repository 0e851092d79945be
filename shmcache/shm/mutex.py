"""A process-shared, robust, error-checking pthread mutex inside a shared buffer.

OS layer: knows nothing of sessions, tables or segments' formats; it is handed a writable
buffer and an offset. Why this mutex (see README "A lock whose owner the kernel knows"):

* **The kernel knows the owner.** The mutex word holds the owner's thread id; when a thread
  dies holding it, the kernel (robust futex list) marks it, and the next locker gets
  ``EOWNERDEAD``. Death is learned from the kernel, never inferred from elapsed time, so a
  holder that is stopped (SIGSTOP), descheduled or starved of the GIL is never taken over.
* **Per thread.** Ownership is the thread, not the process: a thread cannot unlock another's
  hold (``EPERM``), and a thread that locks twice gets ``EDEADLK`` instead of a deadlock.
* **Only writers can hold it.** Locking writes the mutex word: a process that can only read
  the segment cannot take it, so it cannot block anyone (a ``lockf`` could be, by a reader).
* **Cheap**: a trylock and an unlock are one ``ctypes`` call each, about 0.3 us together
  more than a POSIX semaphore (measured: ``python -m bench.lock``).

Signal safety in pure Python rests on one rule: the release is a single call into C that
is harmless when the caller does not hold the mutex. :attr:`Mutex.release` calls
``pthread_mutex_consistent`` and then, from C (ctypes' result converter),
``pthread_mutex_unlock``, with no bytecode in between, so an exception raised by a signal
handler cannot fall between them. Unlock by a non-owner fails with ``EPERM`` and changes
nothing; ``consistent`` by a non-owner is ``EINVAL`` unless the owner has just recovered it,
and then only sets a field glibc does not use to decide ownership. So a ``finally:`` whose
first statement is ``release(...)`` always frees a hold and never frees another's.

Linux with glibc only: the mutex's size and the two words :meth:`Mutex.owner_tid` reads
are glibc's ABI, checked once per process by :func:`probe` on a scratch mutex.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import threading
from typing import Any

from .._errors import IncompatibleSegment

SIZE = 64  # bytes reserved for the mutex; glibc's is 40 (x86-64) or 48 (aarch64)
ABI_GLIBC_X86_64 = 1
ABI_GLIBC_AARCH64 = 2

_TID_MASK = 0x3FFFFFFF  # FUTEX_TID_MASK: the owner's thread id in the mutex word
_OWNER_DIED = 0x40000000  # FUTEX_OWNER_DIED: set by the kernel when the owner died
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ERRORCHECK = 2
_PTHREAD_MUTEX_ROBUST = 1
_CLOCK_MONOTONIC = 1

OK = 0
BUSY = errno.EBUSY
TIMEDOUT = errno.ETIMEDOUT
OWNERDEAD = errno.EOWNERDEAD
NOTRECOVERABLE = errno.ENOTRECOVERABLE
DEADLOCK = errno.EDEADLK


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Libc:
    """The pthread functions, bound once per process."""

    def __init__(self) -> None:
        # PyDLL keeps the GIL for calls that never block (trylock, unlock, consistent);
        # CDLL releases it for the timed lock, which sleeps.
        keep_gil = ctypes.PyDLL(None, use_errno=True)
        drop_gil = ctypes.CDLL(None, use_errno=True)
        self.trylock = keep_gil.pthread_mutex_trylock
        self.unlock = keep_gil.pthread_mutex_unlock
        self.consistent = keep_gil.pthread_mutex_consistent
        self.init = keep_gil.pthread_mutex_init
        self.attr_init = keep_gil.pthread_mutexattr_init
        self.attr_setpshared = keep_gil.pthread_mutexattr_setpshared
        self.attr_setrobust = keep_gil.pthread_mutexattr_setrobust
        self.attr_settype = keep_gil.pthread_mutexattr_settype
        self.attr_destroy = keep_gil.pthread_mutexattr_destroy
        clocklock = getattr(drop_gil, "pthread_mutex_clocklock", None)  # glibc >= 2.30
        if clocklock is None:
            raise IncompatibleSegment(
                "this C library has no pthread_mutex_clocklock (glibc 2.30 or newer needed)"
            )
        self.clocklock = clocklock
        for fn in (self.trylock, self.unlock, self.consistent, self.clocklock):
            fn.restype = ctypes.c_int


_libc: _Libc | None = None
_abi: int | None = None


def probe() -> int:
    """Check, once per process, that this is a C library whose robust mutex we know (glibc
    on x86-64 or aarch64) and return its ABI code, stored in the segment header so that a
    process with another C library refuses the segment. Raises ``IncompatibleSegment``."""
    global _libc, _abi
    if _abi is not None:
        return _abi
    name, _ = platform.libc_ver()
    machine = platform.machine()
    abi = {"x86_64": ABI_GLIBC_X86_64, "aarch64": ABI_GLIBC_AARCH64}.get(machine)
    if name != "glibc" or abi is None:
        found = name or "another C library"
        raise IncompatibleSegment(
            f"shmcache's lock needs glibc on x86-64 or aarch64 (found {found} on {machine})"
        )
    libc = _Libc()
    scratch = ctypes.create_string_buffer(SIZE)
    mutex = Mutex(scratch, 0, libc)
    mutex.initialize()
    tid = threading.get_native_id()
    if mutex.trylock() != OK or mutex.owner_tid() != tid or mutex.word(2) != tid:
        raise IncompatibleSegment("this C library's mutex layout is not the one shmcache knows")
    mutex.release()
    if mutex.word(0) != 0:
        raise IncompatibleSegment("this C library's mutex did not unlock as expected")
    mutex.close()
    _libc, _abi = libc, abi
    return abi


class Mutex:
    """The mutex at ``offset`` of ``buf`` (which must stay mapped while this object lives).

    :meth:`initialize` once, by the segment's creator, before anyone else can see it.
    """

    def __init__(self, buf: Any, offset: int, libc: _Libc | None = None) -> None:
        lib = libc if libc is not None else _libc
        if lib is None:
            probe()
            lib = _libc
        assert lib is not None
        self._lib = lib
        self._cell: Any = ctypes.c_char.from_buffer(buf, offset)
        self.address = ctypes.c_void_p(ctypes.addressof(self._cell))
        self._words = memoryview(buf).cast("B")[offset : offset + 12].cast("i")
        self._trylock = lib.trylock
        self._clocklock = lib.clocklock
        self._unlock = lib.unlock
        # consistent(), then unlock() from C: ctypes calls a non-ctypes ``restype`` with the
        # C result, here a partial that unlocks (the extra int argument is ignored by
        # pthread_mutex_unlock, as the C calling conventions of both ABIs allow).
        consistent_then_unlock = ctypes.PyDLL(None).pthread_mutex_consistent
        consistent_then_unlock.restype = functools.partial(lib.unlock, self.address)
        # A partial of a ctypes function is C all the way down: calling it runs no bytecode,
        # so no signal handler can raise between the call and the unlock.
        self.release: Any = functools.partial(consistent_then_unlock, self.address)
        self._deadline = _Timespec()
        self._deadline_ref = ctypes.byref(self._deadline)

    def initialize(self) -> None:
        """pthread_mutex_init: process-shared, robust, error-checking."""
        lib = self._lib
        attr = ctypes.create_string_buffer(64)  # pthread_mutexattr_t is 4 or 8 bytes
        for rc in (
            lib.attr_init(attr),
            lib.attr_setpshared(attr, _PTHREAD_PROCESS_SHARED),
            lib.attr_setrobust(attr, _PTHREAD_MUTEX_ROBUST),
            lib.attr_settype(attr, _PTHREAD_MUTEX_ERRORCHECK),
            lib.init(self.address, attr),
        ):
            if rc:
                raise OSError(rc, f"pthread mutex setup failed: {os.strerror(rc)}")
        lib.attr_destroy(attr)

    def trylock(self) -> int:
        """OK, BUSY, OWNERDEAD (now ours: make it consistent), NOTRECOVERABLE or DEADLOCK."""
        return int(self._trylock(self.address))

    def lock_until(self, monotonic_deadline: float) -> int:
        """Wait (GIL released) until ``monotonic_deadline``: OK, OWNERDEAD, TIMEDOUT..."""
        seconds = int(monotonic_deadline)
        self._deadline.tv_sec = seconds
        self._deadline.tv_nsec = int((monotonic_deadline - seconds) * 1e9)
        return int(self._clocklock(self.address, _CLOCK_MONOTONIC, self._deadline_ref))

    def make_consistent(self) -> None:
        """After OWNERDEAD: the state the dead owner protected is (being) repaired."""
        self._lib.consistent(self.address)

    def owner_tid(self) -> int:
        """The thread id holding the mutex (0: free, or its holder died)."""
        return int(self._words[0]) & _TID_MASK

    def owner_died(self) -> bool:
        """True if the last holder died holding it and nobody has locked it since."""
        return bool(int(self._words[0]) & _OWNER_DIED)

    def word(self, index: int) -> int:
        return int(self._words[index])

    def close(self) -> None:
        """Drop the references into the buffer (so it can be unmapped)."""
        self._words.release()
        self._cell = None
