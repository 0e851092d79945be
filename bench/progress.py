"""A one-line progress display on stderr (a line per step when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, sections: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._sections = sections
        self._index = 0
        self._section = ""
        self._t0 = time.perf_counter()
        self._quiet = quiet

    def section(self, name: str) -> None:
        self._index += 1
        self._section = name
        self.step("starting")

    def step(self, what: str) -> None:
        if self._quiet:
            return
        line = (
            f"[{self._index}/{self._sections} {self._section}] {what}"
            f"  ({time.perf_counter() - self._t0:5.1f} s)"
        )
        if self._tty:
            # Rewrite one line: the run stays readable, and stdout keeps only the report.
            self._stream.write("\r\x1b[K" + line[:150])
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def note(self, message: str) -> None:
        """A line that stays (a skipped backend, a warning)."""
        if self._tty:
            self._stream.write("\r\x1b[K")
        self._stream.write(message + "\n")
        self._stream.flush()

    def done(self) -> float:
        elapsed = time.perf_counter() - self._t0
        if self._tty and not self._quiet:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
        return elapsed
