"""``with cache:`` for every backend: leaving the block closes the cache."""

from __future__ import annotations

from typing import TypeVar

_T = TypeVar("_T", bound="ClosesOnExit")


class ClosesOnExit:
    """Mixin: ``__enter__`` returns the cache, ``__exit__`` calls its ``close()``;
    ``closed`` reports the ``_closed`` flag that ``close()`` sets."""

    _closed: bool = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release what this object holds (each backend says what)."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
