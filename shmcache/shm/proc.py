"""Process identity and liveness, as the lock needs them (Linux ``/proc``; kill(0) elsewhere).

An owner word is ``pid | (start_time & 0xffffffff) << 32``, where the start time is field
22 of ``/proc/PID/stat`` (clock ticks since boot). Comparing it tells a reused pid from the
process that took the lock. A zombie (state Z) counts as dead: ``kill(pid, 0)`` still
succeeds on a zombie until its parent reaps it, so kill alone would wait for the reap.
"""

from __future__ import annotations

import errno
import os

PID_MASK = 0xFFFFFFFF


def start_time(pid: int) -> tuple[str, int] | None:
    """``(state, start_ticks)`` of a process from /proc, or None if /proc has no such entry."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (IndexError, ValueError):
        return None


def _own_word() -> int:
    pid = os.getpid()
    info = start_time(pid)
    return pid | (((info[1] if info else 0) & 0xFFFFFFFF) << 32)


class _Identity:
    """This process's owner word, recomputed in a forked child (the pid changes)."""

    word = _own_word()


def _after_fork() -> None:
    _Identity.word = _own_word()


os.register_at_fork(after_in_child=_after_fork)


def my_word() -> int:
    return _Identity.word


def is_alive(word: int) -> bool:
    """Is the process named by an owner word still running (and not a zombie)?

    Conservative where it cannot tell: a process hidden from us (``hidepid``, another user)
    that answers kill(0) with EPERM counts as alive, so we never break a live owner's lock.
    """
    pid = word & PID_MASK
    want = word >> 32
    if pid <= 0:
        return False
    info = start_time(pid)
    if info is not None:
        state, ticks = info
        if state in ("Z", "X", "x"):
            return False
        return not want or (ticks & 0xFFFFFFFF) == want
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    # kill(0) succeeded but /proc shows nothing (no /proc mounted): alive, though a reused
    # pid cannot be told apart here.
    return True


def pid_namespace() -> int:
    """Inode of our pid namespace (0 if unknown): pids mean nothing across namespaces."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def time_namespace() -> int:
    """Inode of our time namespace (0 if unknown): CLOCK_MONOTONIC, in which expiry times
    are stored, is offset per time namespace (``unshare --time``)."""
    try:
        return os.stat("/proc/self/ns/time").st_ino
    except OSError:
        return 0


def pid_of_thread(tid: int) -> int | None:
    """The process (thread group) of thread ``tid``, or None if no such thread exists."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
