"""How the ``shmcache`` command meets its standard streams (integration layer, CLI only).

Whatever the caller did with them, the answer is one line on stderr or silence, never a
traceback (issue 12: ``shmcache list --json | head -5`` ended in ``[Errno 32] Broken pipe``):

* a descriptor 0-2 that is closed at start gets /dev/null, so no segment that the command
  opens later can take its number and receive its output;
* a closed stdout (``shmcache reset NAME --yes >&-``) is refused before anything changes:
  nothing could say what was done;
* a reader that goes away (``| head``) ends the command quietly with status 141, what a
  shell reports for a process killed by SIGPIPE (``cat``, ``ls``...);
* any other write error (a full disk, ``>/dev/full``) is one line on stderr, status 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

SIGPIPE_STATUS = 128 + int(signal.SIGPIPE)


def fill_closed_descriptors() -> None:
    """Put /dev/null on each of fds 0, 1 and 2 that is closed."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def stdout_is_closed() -> bool:
    """True when the command was started with stdout closed (Python then has no
    ``sys.stdout``): checked before the command runs, so it refuses with nothing changed."""
    return sys.stdout is None


def error(message: str) -> None:
    """One line on stderr; nothing at all if stderr is closed (never onto stdout)."""
    stream = sys.__stderr__ if sys.stderr is None else sys.stderr
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):
        stream.write(message.rstrip("\n") + "\n")
        stream.flush()


def discard_stdout() -> None:
    """After a failed write: point fd 1 at /dev/null, so the interpreter's own flush at exit
    does not fail a second time and print "Exception ignored" (the Python docs' advice for
    SIGPIPE)."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)


def flush_stdout() -> int | None:
    """Flush what the command printed; ``None`` if it went out, else the exit status."""
    if sys.stdout is None:
        return None
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        return SIGPIPE_STATUS
    except OSError as exc:
        discard_stdout()
        error(f"shmcache: cannot write to standard output: {exc.strerror or exc}")
        return 1
    return None
