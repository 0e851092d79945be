"""A clock tests move by hand (a plain module: several conftest.py files exist)."""

from __future__ import annotations


class FakeClock:
    """A clock tests move by hand (seconds, like time.monotonic)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
