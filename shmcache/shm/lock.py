"""The segment lock: one writer at a time, across every thread of every process.

A robust pthread mutex in the segment header (``mutex.py`` says why that mechanism). Its
owner is a thread the kernel knows, so:

* a holder that is alive is never taken over, however long it is stopped, descheduled or
  starved of the GIL: a waiter whose wait passes ``timeout`` raises ``LockTimeout``;
* a holder that dies is reported by the kernel to the next locker (``EOWNERDEAD``), which
  makes the mutex consistent, counts ``lock_recoveries`` and runs ``on_recover`` (the table
  replays its journal: the half-written slot is dropped, an interrupted clear finished);
* a holder that raised out of its critical section (a signal handler's exception) has
  released the lock in its ``finally``; if its write was cut short, ``W_WRITING`` is still
  set and the next holder repairs what the journal names (not a death: not counted).

Every caller follows one pattern, because in pure Python an exception from a signal
handler can surface at any call boundary::

    lock.refuse_reentry()        # before the try: raises if this thread holds the lock
    try:
        gen = lock.acquire()     # inside the try: a hold taken is always released
        ... write ...
        words[W_WRITING] = 0     # last statement of the try: the write is complete
    finally:
        lock.release()           # first statement: one C call, no Python frame

``release`` is harmless when this thread holds nothing, so the ``finally`` needs no flag
(setting one would itself be a statement a signal could fall before).

The compiled core (``_fast.c``) follows the same protocol on the same mutex (its
``acquire`` mirrors this one), so writers of both kinds exclude each other.

Imports: the OS-level ``mutex`` and ``layout`` (header word indexes); nothing of sessions.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .._errors import LockTimeout, SegmentCorrupted, ShmCacheError
from . import mutex as _mutex
from .layout import MUTEX_OFFSET, U64, W_GEN, W_RECOVERIES, W_WRITING

_SLICE = 0.02  # seconds per timed wait: pending signal handlers run between slices
_SPINS = 20  # trylocks (with sched_yield) before sleeping: a hold lasts microseconds


class _ThreadId(threading.local):
    def __init__(self) -> None:
        self.tid = threading.get_native_id()


_me = _ThreadId()


def _after_fork() -> None:
    # The child's thread has another id; the copied thread-local would still say the parent's.
    global _me
    _me = _ThreadId()


os.register_at_fork(after_in_child=_after_fork)


class SegmentLock:
    """Mutual exclusion between all writers of one segment.

    ``buf`` is the mapped segment, ``words`` the same as u64 words (generation, journal and
    recovery counter live in the header); ``on_recover`` runs with the lock held when the
    previous holder died or left a write unfinished, to repair what it was writing.
    """

    def __init__(
        self,
        buf: Any,
        words: memoryview,
        on_recover: Callable[[], object],
        *,
        timeout: float = 1.0,
    ) -> None:
        self._mutex = _mutex.Mutex(buf, MUTEX_OFFSET)
        self._words = words
        self._on_recover = on_recover
        self.timeout = timeout
        self._trylock = self._mutex.trylock
        self._owner_tid = self._mutex.owner_tid
        self.release: Callable[[], Any] = self._mutex.release

    @staticmethod
    def initialize(buf: Any) -> None:
        """Set the mutex up in a new segment (by its creator, before anyone can attach)."""
        mutex = _mutex.Mutex(buf, MUTEX_OFFSET)
        mutex.initialize()
        mutex.close()

    def refuse_reentry(self) -> None:
        """Raise if this thread already holds the lock (a signal handler that uses the cache
        while its thread is inside a write): waiting would deadlock, going on would let two
        writes interleave. Call it before the ``try`` (see the module docstring)."""
        if self._owner_tid() == _me.tid:
            raise ShmCacheError(
                "shmcache write re-entered while this thread holds the segment lock (a signal "
                "handler called the cache during a write): refused, nothing changed"
            )

    # The uncontended path is one trylock and three word accesses: it is on every write.
    def acquire(self) -> int:
        """Take the lock; returns the new generation (unique per acquisition)."""
        rc = self._trylock()
        if rc:
            rc = self._contended(rc)
        words = self._words
        if rc == _mutex.OWNERDEAD:
            self._recover_dead_holder()
        elif words[W_WRITING]:
            self._on_recover()  # a live holder's write was cut short by an exception
        words[W_WRITING] = 1  # the caller clears it when its write is complete
        gen = (words[W_GEN] + 1) & U64
        words[W_GEN] = gen
        return gen

    def _contended(self, rc: int) -> int:
        """The lock was not free: spin a little, then sleep in slices until ``timeout``."""
        mutex = self._mutex
        for _ in range(_SPINS):
            if rc != _mutex.BUSY:
                return self._checked(rc)
            os.sched_yield()
            rc = self._trylock()
        if rc != _mutex.BUSY:
            return self._checked(rc)
        start = time.monotonic()
        deadline = start + self.timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeout(
                    f"waited {now - start:.2f} s for the shmcache lock (lock_timeout "
                    f"{self.timeout} s), held by live threads all along (now thread "
                    f"{self._owner_tid() or '?'}; a dead holder is recovered at once): "
                    "nothing was changed"
                )
            # Between slices, pending signal handlers run; what they raise propagates.
            rc = mutex.lock_until(min(deadline, now + _SLICE))
            if rc != _mutex.TIMEDOUT:
                return self._checked(rc)

    def _checked(self, rc: int) -> int:
        if rc in (_mutex.OK, _mutex.OWNERDEAD):
            return rc
        if rc == _mutex.NOTRECOVERABLE:
            raise SegmentCorrupted(
                "the segment lock is unrecoverable (a holder released it without repairing "
                "after its predecessor died): recreate the segment (shmcache reset cannot)"
            )
        raise OSError(rc, f"shmcache lock: {os.strerror(rc)}")

    def _recover_dead_holder(self) -> None:
        """Caller holds the lock, acquired with EOWNERDEAD: its previous holder died. The
        journal names the last slot it wrote; ``on_recover`` verifies it (a holder may die
        after its last store but before it cleared ``W_WRITING``, or before release)."""
        self._mutex.make_consistent()
        words = self._words
        words[W_RECOVERIES] = (words[W_RECOVERIES] + 1) & U64
        self._on_recover()
        words[W_WRITING] = 0

    def held(self) -> bool:
        """True if the calling thread holds the lock."""
        return self._owner_tid() == _me.tid

    def owner(self) -> int:
        """The thread id of the holder (0: free, or its holder died and nobody locked it
        since). A thread id is also a pid in ``/proc``."""
        return self._owner_tid()

    def owner_died(self) -> bool:
        """True if the last holder died holding the lock and nobody has taken it since."""
        return self._mutex.owner_died()

    def recover_if_abandoned(self) -> bool:
        """Repair and free the lock now if its holder died (for gunicorn's ``child_exit`` and
        ``shmcache unlock``). Returns True if it recovered; never waits, and never touches a
        lock held by a live thread."""
        self.refuse_reentry()
        recovered = False
        try:
            rc = self._trylock()
            if rc == _mutex.OWNERDEAD:
                self._recover_dead_holder()
                recovered = True
            elif rc == _mutex.OK and self._words[W_WRITING]:
                self._on_recover()
                self._words[W_WRITING] = 0
        finally:
            self.release()
        return recovered

    def close(self) -> None:
        self._mutex.close()
