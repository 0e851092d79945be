"""The administrator's side of ``SharedMemorySessionCache``: figures, integrity, upkeep.

A mixin of the cache class, split out so each file reads in one sitting: what a request
needs (``get``/``set``/``invalidate``) is in ``cache.py``; what ``shmcache stats``,
``check``, ``purge``, ``unlock`` and the gunicorn hooks need is here. It uses the cache's
segment, table, lock and counters; it imports nothing above the shm layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._errors import CacheClosed, IncompatibleSegment, LockTimeout, ShmCacheError
from . import proc as _proc
from .counters import ProcessCounters
from .layout import (
    OP_CLEAR,
    OP_NONE,
    OP_SLOT,
    U64,
    W_CLEARS,
    W_EVICTIONS,
    W_KEEPER,
    W_LEASE_DROPS,
    W_OVERSIZE,
    W_RECOVERIES,
    W_WRITING,
    HeaderInfo,
    read_header,
)
from .lock import SegmentLock
from .segment import Segment
from .table import Table

_PURGE_CHUNK = 4096  # slots reclaimed per lock hold, so purge never stalls writers long


class SegmentAdmin:
    """Stats, check, purge, lock recovery and the segment's name (see module docstring)."""

    _segment: Segment
    _info: HeaderInfo
    _table: Table
    _words: memoryview
    _lock: SegmentLock
    _counters: ProcessCounters
    _counter_rec: int
    _hits: int
    _misses: int
    _decode_errors: int
    _lease_drops: int
    _local: dict[str, Any]
    _clock: Callable[[], float]
    _object_id: int
    _closed: bool
    _fast: Any  # the compiled core (fast.py), or None: then it keeps this object's figures

    # -- maintenance ---------------------------------------------------------------------

    def purge(self) -> int:
        """Reclaim every expired entry now (``set`` also reclaims them as it goes); returns
        how many. Holds the lock for at most a few thousand slots at a time."""
        self._ensure_open()
        total = 0
        phys = self._info.geometry.physical_slots
        lock = self._lock
        lock.refuse_reentry()
        for start in range(0, phys, _PURGE_CHUNK):
            now_ms = self._now_ms()
            try:  # the pattern of lock.py: acquire inside, release first in the finally
                lock.acquire()
                total += self._table.purge_locked(start, start + _PURGE_CHUNK, now_ms)
                self._words[W_WRITING] = 0  # done: nothing for the next holder to repair
            except BaseException:
                self._repair_if_held()  # e.g. a signal handler raised mid-write
                raise
            finally:
                lock.release()
        return total

    def stats(self) -> dict[str, Any]:
        """Figures for the whole segment.

        ``hits`` and ``misses`` add up every process's published counters; a process
        counts them locally (no shared write on ``get``) and publishes them at every miss,
        invalidate, clear and ``stats`` call, so another worker's figures may lag by the
        hits since its last such call. ``process_hits``/``process_misses`` are this
        object's own, exact.
        """
        self._ensure_open()
        self._publish()
        hits, misses, processes = self._counters.totals()
        geo = self._info.geometry
        census = self._table.census(self._now_ms())
        words = self._words
        owner = self._lock.owner()
        owner_pid = _proc.pid_of_thread(owner) if owner else None
        occupied = census["entries"] + census["expired"] + census["invalid"]
        table_arena = self._table.arena
        arena = table_arena.stats() if table_arena is not None else {
            "arena_bytes": 0, "arena_committed_bytes": 0, "value_bytes": 0, "arena_full": 0,
            "arena_rebuilds": 0,
        }
        return {
            "name": self._segment.name,
            "capacity": geo.capacity,
            "slots": geo.physical_slots,
            "window": geo.window,
            "value_size": geo.value_size,
            "size_bytes": geo.size,
            # What /dev/shm really holds: the table, plus the arena pages values needed so
            # far (the arena is reserved as it fills: see arena.py).
            "committed_bytes": geo.reserved_at_creation + arena["arena_committed_bytes"],
            **arena,
            "entries": census["entries"],
            "expired": census["expired"],
            "invalid": census["invalid"],
            "tombstones": 0,  # removals zero their slot: this table has none
            "load_factor": occupied / geo.physical_slots,
            "hits": hits if self._counter_rec >= 0 else hits + self._hits,
            "misses": misses if self._counter_rec >= 0 else misses + self._misses,
            "process_hits": self._hits,
            "process_misses": self._misses,
            "processes": processes,
            "decode_errors": self._decode_errors,
            "evictions": int(words[W_EVICTIONS]),
            "lock_recoveries": int(words[W_RECOVERIES]),
            "oversize": int(words[W_OVERSIZE]),
            "lease_drops": int(words[W_LEASE_DROPS]),  # sets a racing logout kept out
            "process_lease_drops": self._lease_drops,  # this object's, exact
            "clears": int(words[W_CLEARS]),
            # The kernel clears a dead holder's thread id from the mutex: an id there is a
            # live thread (or garbage written by someone who could write the segment).
            "lock_owner": owner_pid,
            "lock_owner_thread": owner or None,
            "lock_owner_alive": owner_pid is not None,
            "lock_abandoned": self._lock.owner_died(),
            "keeper_pid": (int(words[W_KEEPER]) & _proc.PID_MASK) or None,
            "creator_pid": self._info.creator_pid,
            "created": self._info.created,
            "local_sessions": len(self._local),
            # Which code ran this object's get/set/invalidate: "c" (the compiled core) or
            # "python" (not built, or SHMCACHE_PURE_PYTHON set). Both share one segment.
            "implementation": "python" if self._fast is None else "c",
        }

    def check(self) -> list[str]:
        """Integrity check of the whole segment: a list of problems, ``[]`` when whole.

        Scans without the lock, then re-checks anything suspicious under it (a writer
        racing the scan is not a problem). Taking the lock also recovers it from a dead
        holder, so a check after a crash reports what recovery could not mend.
        """
        self._ensure_open()
        problems: list[str] = []
        try:
            if read_header(self._segment.mm, len(self._segment.mm)) != self._info:
                problems.append("header: immutable fields changed since attach")
        except IncompatibleSegment as exc:
            problems.append(f"header: {exc}")
        suspicious = self._table.problems()
        # Read before the lock: taking it repairs (and clears) what the journal names.
        op, slot = self._table.journal()
        if op not in (OP_NONE, OP_SLOT, OP_CLEAR) or (
            op == OP_SLOT and slot >= self._info.geometry.physical_slots
        ):
            problems.append(f"journal: unreadable word (op {op}, slot {slot})")
        lock = self._lock
        lock.refuse_reentry()
        try:
            try:
                lock.acquire()
            except LockTimeout as exc:
                problems.append(f"lock: {exc}")
                return problems
            for slot in suspicious:
                problem = self._table.slot_problem(slot) or self._table.duplicate_problem(slot)
                if problem is not None and problem not in problems:
                    problems.append(problem)
            problems.extend(self._table.arena_problems_locked())
            self._words[W_WRITING] = 0  # every holder clears it (lock.py)
        finally:
            lock.release()
        return problems

    def recover_lock(self) -> bool:
        """Repair and free the lock now if its holder died (gunicorn's ``child_exit`` and
        ``shmcache unlock`` call this); False if there was nothing to do. Never waits."""
        self._ensure_open()
        return self._lock.recover_if_abandoned()

    def unlink(self) -> None:
        """Remove the segment's name, and a semaphore an older shmcache left beside it
        (processes attached keep working until they close; nobody new can attach)."""
        self._segment.unlink()

    # The keeper is the process whose exit removes the name: the creator, until another
    # process adopts the segment. A gunicorn master started by a binary upgrade (USR2)
    # adopts its predecessor's segment, so the old master's exit leaves the name alone.

    def adopt(self) -> None:
        """Make this process the segment's keeper."""
        self._ensure_open()
        self._words[W_KEEPER] = _proc.my_word()

    def unlink_if_keeper(self) -> bool:
        """Unlink the name if this process is the keeper, or the keeper is gone (an adopter
        that died, as after an aborted upgrade). Returns True if it unlinked."""
        self._ensure_open()
        keeper = int(self._words[W_KEEPER])
        if keeper and keeper != _proc.my_word() and _proc.is_alive(keeper):
            return False
        self.unlink()
        return True

    def chown(self, uid: int, gid: int) -> None:
        """Give the segment to ``uid``/``gid`` (for workers that drop
        privileges and must attach by name; forked workers keep their inherited mapping)."""
        self._ensure_open()
        self._segment.chown(uid, gid)

    # -- helpers the cache shares ---------------------------------------------------------

    def _now_ms(self) -> int:
        return round(self._clock() * 1000)

    def _publish(self) -> None:
        """Copy this object's hit/miss counters into its record in the header."""
        self._pull_counts()
        rec = self._counter_rec
        if rec == -2:
            if not (self._hits or self._misses):
                return  # nothing to say yet (an admin command's stats() takes no record)
            lock = self._lock
            if lock.held():
                return  # a signal handler's get() inside this thread's write: later
            rec = -2
            try:
                lock.acquire()
                rec = self._claim_counter_locked()
                self._words[W_WRITING] = 0
            except ShmCacheError:
                pass  # a live holder past lock_timeout: the figures stay local, retry later
            finally:
                lock.release()
        if rec >= 0:
            words = self._words
            words[rec + 1] = self._hits & U64
            words[rec + 2] = self._misses & U64

    def _claim_counter_locked(self) -> int:
        """This object's record, claimed now if it has none yet (another thread of this
        process may have claimed it meanwhile). Caller holds the lock: ``_publish``, or the
        compiled core's own publish, which calls this under its lock."""
        rec = self._counter_rec
        if rec == -2:
            rec = self._counters.claim_locked(_proc.my_word(), self._object_id)
            self._counter_rec = rec
            if self._fast is not None:
                self._fast.counter_rec = rec
        return rec

    def _pull_counts(self) -> None:
        """With the compiled core, this object's figures are the core's: copy them here."""
        core = self._fast
        if core is not None:
            self._hits, self._misses = core.hits, core.misses
            self._decode_errors, self._lease_drops = core.decode_errors, core.lease_drops

    def _repair_if_held(self) -> None:
        """The end of a write that raised with the lock held (the except half of lock.py's
        pattern): finish or undo it from the journal, so the next holder need not."""
        if self._lock.held():
            self._table.repair_locked()
            self._words[W_WRITING] = 0

    def _ensure_open(self) -> None:
        if self._closed:
            raise CacheClosed("this SharedMemorySessionCache is closed")
