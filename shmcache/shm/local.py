"""What one process keeps of the shared table: its own copies of sessions, and how a
session is turned into what the table stores (value bytes and fingerprint).

A mixin of ``SharedMemorySessionCache`` (layer: the cache), split out so that each file reads
in one sitting. Imports nothing above the shm layer.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

from .._errors import InvalidType
from ..codecs import Codec
from .layout import HeaderInfo
from .segment import Segment
from .table import Table

log = logging.getLogger("shmcache")
_warned_oversize = False

# This process's copy of a session: (session, check word index, check, expiry, fingerprint)
_Local = tuple[Any, int, int, float, int]


class LocalCopies:
    """The per-process map and the encoder (see the module docstring)."""

    _table: Table
    _info: HeaderInfo
    _codec: Codec | None
    _value_mode: bool
    _local: dict[str, _Local]
    _max_local: int
    _checks_w: int
    _words: memoryview
    _oversize_len: int
    _clock: Any
    _segment: Segment

    def _encode(self, session: Any) -> tuple[bytes | None, int, bool]:
        """``(value to share or None, fingerprint, oversize)``. The fingerprint lets other
        processes keep their copy of an equal session; in hash-only mode it is taken from
        the codec's encoding if one was given, else from :func:`_canonical`. 0 if the
        session cannot be encoded."""
        table = self._table
        if not self._value_mode:
            try:
                data = self._codec.encode(session) if self._codec else _canonical(session)
            except Exception:
                return None, 0, False
            return None, table.fingerprint(bytes(data)), False
        assert self._codec is not None
        data = self._codec.encode(session)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidType(f"codec.encode returned {type(data).__name__}, not bytes")
        value = bytes(data)
        fp = table.fingerprint(value)
        if len(value) > self._info.geometry.value_size:
            self._oversize_len = len(value)
            return None, fp, True
        return value, fp, False

    def _warn_oversize(self, _: int) -> None:
        """Once per process: a session too large for value_size is shared without its value
        (a hit only where it was set), which silently multiplies validations."""
        global _warned_oversize  # once per process, not per cache object
        if not _warned_oversize:
            _warned_oversize = True
            log.warning(
                "shmcache segment %r: a session encoded to %d bytes, more than value_size=%d: "
                "it is cached without its value (other processes miss it). Create the segment "
                "with a larger value_size (stats()['oversize'] counts these).",
                self._segment.name, self._oversize_len, self._info.geometry.value_size,
            )

    def _remember(
        self, token: str, session: Any, slot: int, check: int, expiry_ms: int, fp: int
    ) -> None:
        local = self._local
        if len(local) >= self._max_local and token not in local:
            self._prune_local()
        local[token] = (session, self._checks_w + slot, check, expiry_ms / 1000, fp)

    def _prune_local(self) -> None:
        """Bound the per-process map: drop entries the table no longer vouches for, then
        the oldest ones, down to half the bound, so that pruning stays amortised O(1) per
        set (they are only a cache of a cache: a dropped entry is a miss, never an error)."""
        words, now = self._words, self._clock()
        local = self._local
        for token, (_, word, check, expires, _) in list(local.items()):
            if words[word] != check or now >= expires:
                local.pop(token, None)  # another thread may have dropped it already
        excess = len(local) - self._max_local // 2
        if excess > 0:
            for token in list(local)[:excess]:
                local.pop(token, None)


def _canonical(session: Any) -> bytes:
    """Bytes that are equal for equal sessions in every process, for the fingerprint of a
    hash-only entry with no codec. A pydantic model's pickle is not (it holds the set of
    fields given, whose order follows the per-process hash seed), so pydantic models use
    their JSON; anything else its pickle (nothing is ever unpickled from it)."""
    dump_json = getattr(session, "model_dump_json", None)
    if callable(dump_json):
        return str(dump_json()).encode()
    return pickle.dumps(session, 5)
