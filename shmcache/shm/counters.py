"""Segment-wide hit and miss counters without a shared write on every ``get``.

Each process counts its hits and misses in plain attributes and publishes them now and then
(at every miss, set, invalidate, clear and stats call) into a record of its own in the
header: ``(owner word, hits, misses, spare)``. A record has a single writer, so publishing
needs no lock and loses no update; readers add the records up. Records of dead processes
are folded into two "retired" words when their slot is reused, so totals survive worker
restarts. Claiming and giving back a record happen under the segment lock (the caller
holds it), so two processes never claim one record; the lock is recovered if a claimer dies.
"""

from __future__ import annotations

from collections.abc import Callable

from .layout import (
    COUNTER_RECORDS,
    COUNTER_RECORDS_W,
    U64,
    W_RETIRED_HITS,
    W_RETIRED_MISSES,
)


class ProcessCounters:
    """The per-process records in the header; ``words`` is the segment as u64 words.

    A record is keyed by the owner word (pid and start time, for liveness) and an object id,
    so two cache objects in one process (create and attach, in tests) keep separate records.
    """

    def __init__(self, words: memoryview, is_alive: Callable[[int], bool]) -> None:
        self._words = words
        self._is_alive = is_alive

    def claim_locked(self, me: int, object_id: int) -> int:
        """Index (in ``words``) of a zeroed record for this object; -1 if all are held by
        live objects (this object's figures then stay local). Caller holds the lock."""
        words = self._words
        for i in range(COUNTER_RECORDS):
            rec = COUNTER_RECORDS_W + 4 * i
            owner = words[rec]
            if not owner or not self._is_alive(owner):
                self._retire(rec)
                words[rec + 3] = object_id
                words[rec] = me
                return rec
        return -1

    def release_locked(self, rec: int, object_id: int) -> None:
        """Give a record back (its figures go to the retired totals). Caller holds the lock."""
        words = self._words
        if words[rec + 3] == object_id:
            self._retire(rec)
            words[rec] = 0
            words[rec + 3] = 0

    def _retire(self, rec: int) -> None:
        words = self._words
        words[W_RETIRED_HITS] = (words[W_RETIRED_HITS] + words[rec + 1]) & U64
        words[W_RETIRED_MISSES] = (words[W_RETIRED_MISSES] + words[rec + 2]) & U64
        words[rec + 1] = 0
        words[rec + 2] = 0

    def totals(self) -> tuple[int, int, int]:
        """``(hits, misses, processes)`` over the whole segment, as last published."""
        words = self._words
        hits, misses = int(words[W_RETIRED_HITS]), int(words[W_RETIRED_MISSES])
        owners = set()
        for i in range(COUNTER_RECORDS):
            rec = COUNTER_RECORDS_W + 4 * i
            if words[rec]:
                hits += words[rec + 1]
                misses += words[rec + 2]
                owners.add(words[rec])
        return hits, misses, len(owners)
