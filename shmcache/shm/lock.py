"""A POSIX semaphore used as a mutex that survives the death of its holder.

A semaphore has no owner: a process SIGKILLed while holding it leaves it at 0 and every
other process waits forever (APCu #86 and uWSGI #1202 never fixed this). So the holder
writes its owner word (pid and start time, see ``_proc``) into the segment right after
taking the semaphore and clears it right before posting it, and waiters that wait too long
look at that word:

* owner set and dead (gone, zombie, or its pid reused): the lock was abandoned;
* owner clear and the generation unchanged for ``timeout / 2``: the holder died in the
  few instructions between the semaphore and the owner word (a live process would have to
  stall that long between two statements);
* owner alive and unchanged for ``timeout``: ``LockTimeout``.

Recovery does not post the semaphore (two waiters posting would let two processes in).
The recovering waiter *takes over* the dead holder's acquisition: it writes itself as the
owner, so the count stays at 0 and exactly one process holds the lock. Waiters decide who
recovers with an ``lockf`` record lock on the segment's fd: the kernel drops a record lock
when its process dies, so a recoverer killed mid-recovery cannot block the next one, and
record locks are per process, so they exclude forked siblings sharing the fd (``flock``
would not). Under that lock the waiter re-reads the owner word and generation: if anyone
took or released the lock since, it backs off.

Signals: posix_ipc turns an interrupted wait into ``SignalError`` and swallows the
``SystemExit`` that gunicorn's SIGABRT/SIGQUIT handlers raise (FIELD-NOTES 3). So blocking
waits run with signals blocked, in slices of ``_SLICE`` seconds; between slices the mask is
lifted, pending handlers run as ordinary Python code, and whatever they raise propagates
(we hold nothing while waiting), so a worker being shut down exits within one slice.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
import weakref
from collections.abc import Callable
from typing import Any

import posix_ipc

from .._errors import LockTimeout
from . import proc as _proc
from .layout import U64, W_GEN, W_OWNER, W_RECOVERIES

_SLICE = 0.02
_SPINS = 100  # about 50-100 us of retries: longer than any critical section
_TIMED_WAIT = bool(getattr(posix_ipc, "SEMAPHORE_TIMEOUT_SUPPORTED", False))
_HAS_VALUE = bool(getattr(posix_ipc, "SEMAPHORE_VALUE_SUPPORTED", False))
_ALL_SIGNALS = signal.valid_signals() if hasattr(signal, "valid_signals") else set()

_locks: weakref.WeakSet[SegmentLock] = weakref.WeakSet()


def _after_fork() -> None:
    # A forked child inherits the lock objects but is another process: new owner word.
    for lock in list(_locks):
        lock._me = _proc.my_word()


os.register_at_fork(after_in_child=_after_fork)


class SegmentLock:
    """Mutual exclusion between the processes of one segment.

    ``words`` is the segment as u64 words (owner, generation and recovery counter live in
    the header); ``fd`` is any descriptor of the segment, used for the recovery record lock;
    ``on_recover`` runs with the lock held after a takeover, to repair what the dead holder
    was writing.
    """

    def __init__(
        self,
        sem: Any,
        words: memoryview,
        fd: int,
        on_recover: Callable[[], object],
        *,
        timeout: float = 1.0,
        is_alive: Callable[[int], bool] = _proc.is_alive,
    ) -> None:
        self._sem = sem
        self._words = words
        self._fd = fd
        self._on_recover = on_recover
        self.timeout = timeout
        self._is_alive = is_alive
        self._sem_acquire = sem.acquire
        self._sem_release = sem.release
        self._me = _proc.my_word()
        _locks.add(self)

    # The uncontended path is a trywait and four word accesses: it is on every write, so it
    # is written flat (each Python call here costs as much as the semaphore itself).
    def acquire(self) -> int:
        """Take the lock; returns the new generation (unique per acquisition)."""
        try:
            self._sem_acquire(0)
        except posix_ipc.BusyError:
            return self._spin_then_wait()
        words = self._words
        if words[W_OWNER]:
            return self._wait(absorbed=True)  # taken over while we stalled: see _claim
        gen = (words[W_GEN] + 1) & U64
        words[W_GEN] = gen
        words[W_OWNER] = self._me
        return gen

    def release(self) -> None:
        words = self._words
        if words[W_OWNER] == self._me:
            words[W_OWNER] = 0
            self._sem_release()
        # Otherwise someone judged our acquisition abandoned and took it over: it is theirs
        # to post, and posting it too would let two processes in.

    def _claim(self) -> int:
        words = self._words
        if words[W_OWNER]:
            # We got the semaphore, but a recoverer already took this acquisition over as
            # abandoned (we stalled in the window before writing our owner word). It will
            # post when done; we go back to waiting.
            return -1
        gen = (words[W_GEN] + 1) & U64
        words[W_GEN] = gen
        words[W_OWNER] = self._me
        return gen

    def _spin_then_wait(self) -> int:
        """Contended: retry a few times, yielding the CPU in between, before sleeping.

        A holder keeps the lock for a few microseconds; a futex sleep and wake-up (plus the
        signal mask calls around it) cost more than that, and with more processes than
        cores the yield is also what lets a preempted holder finish.
        """
        for _ in range(_SPINS):
            os.sched_yield()
            try:
                self._sem_acquire(0)
            except posix_ipc.BusyError:
                continue
            gen = self._claim()
            return gen if gen >= 0 else self._wait(absorbed=True)
        return self._wait()

    def _wait(self, absorbed: bool = False) -> int:
        blocked = _TIMED_WAIT and bool(_ALL_SIGNALS)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS) if blocked else None
        try:
            return self._wait_loop(old_mask, absorbed)
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _wait_loop(self, old_mask: Any, absorbed: bool) -> int:
        """Wait for the lock. ``absorbed``: we took the semaphore but found an owner word set,
        so our decrement may be the one a recoverer took over (it will post when done)."""
        words = self._words
        observed = (words[W_OWNER], words[W_GEN])
        since = time.monotonic()
        while True:
            if self._wait_slice():
                gen = self._claim()
                if gen >= 0:
                    return gen
                absorbed = True
            if old_mask is not None:
                # Let pending signals in: their Python handlers run now, and a SystemExit
                # or KeyboardInterrupt they raise propagates out of acquire().
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
            now = time.monotonic()
            current = (words[W_OWNER], words[W_GEN])
            if current != observed:
                observed, since = current, now
                continue
            owner = current[0]
            if owner:
                if not self._is_alive(owner):
                    gen = self._take_over(current)
                    if gen >= 0:
                        return gen
                elif now - since >= self.timeout and absorbed:
                    # We hold a decrement and the "owner" has not moved for a whole
                    # timeout: no recoverer holds a critical section that long, so the word
                    # is garbage (a damaged segment). The decrement is ours: claim it.
                    return self._claim_absorbed()
                elif now - since >= self.timeout:
                    raise LockTimeout(
                        f"process {owner & _proc.PID_MASK} has held the shmcache lock for "
                        f"{now - since:.2f} s (lock_timeout {self.timeout} s)"
                    )
            elif now - since >= self.timeout / 2:
                gen = self._take_over(current)
                if gen >= 0:
                    return gen

    def _claim_absorbed(self) -> int:
        words = self._words
        gen = (words[W_GEN] + 1) & U64
        words[W_GEN] = gen
        words[W_OWNER] = self._me
        words[W_RECOVERIES] = (words[W_RECOVERIES] + 1) & U64
        try:
            self._on_recover()
        except BaseException:
            self.release()
            raise
        return gen

    def _wait_slice(self) -> bool:
        try:
            if _TIMED_WAIT:
                self._sem.acquire(_SLICE)
            else:  # macOS: no sem_timedwait, poll (time.sleep lets handlers raise as usual)
                self._sem.acquire(0)
        except posix_ipc.BusyError:
            if not _TIMED_WAIT:
                time.sleep(0.001)
            return False
        except posix_ipc.SignalError:
            return False
        return True

    def _take_over(self, observed: tuple[int, int]) -> int:
        """Become the holder of an abandoned acquisition; -1 if it is not (or no longer) ours
        to take."""
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            return -1  # another waiter is recovering right now
        try:
            words = self._words
            if (words[W_OWNER], words[W_GEN]) != observed:
                return -1
            if observed[0] and self._is_alive(observed[0]):
                return -1
            if _HAS_VALUE and self._sem.value != 0:
                return -1  # released meanwhile: take it the ordinary way
            gen = (observed[1] + 1) & U64
            words[W_GEN] = gen
            words[W_OWNER] = self._me
            words[W_RECOVERIES] = (words[W_RECOVERIES] + 1) & U64
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0)
        try:
            self._on_recover()
        except BaseException:
            self.release()
            raise
        return gen

    def owner(self) -> int:
        """The current owner word (0: nobody, or a holder between two instructions)."""
        return int(self._words[W_OWNER])

    def recover_if_abandoned(self) -> bool:
        """Free the lock now if its recorded owner is dead (for ``child_exit`` and the admin
        command). Returns True if it recovered; never touches a lock held by a live process."""
        words = self._words
        observed = (words[W_OWNER], words[W_GEN])
        if not observed[0] or self._is_alive(observed[0]):
            return False
        if self._take_over(observed) < 0:
            return False
        self.release()
        return True
