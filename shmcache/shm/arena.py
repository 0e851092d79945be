"""Variable-size value storage: an allocator over the segment's value arena.

Same layer as ``table`` (a plain buffer; no OS call but the ``commit`` callback it is
given, no clock, no lock: every method ending in ``_locked`` wants the segment lock).

Why an arena and not a value area per slot: a slot sized for the largest session wastes
``value_size - len(value)`` bytes in every slot, and a table runs half empty, so a 400-byte
``value_size`` cost 800+ bytes per session whatever the sessions weighed. Here a value takes
``ceil(len / 16)`` units of 16 bytes in one block, so a session costs its encoding plus at
most 15 bytes of padding (and the 8-byte reference in its slot).

Memory grows with use. The arena's pages are reserved on demand (``commit``: the segment
calls ``posix_fallocate`` for the next step, at most 64 MiB, after checking that /dev/shm
has that much free, since a failing fallocate on tmpfs briefly takes every free page), so
the shared memory used follows the sessions actually stored, up to a ``value_size`` block
per slot; a reader never touches a page that was not reserved (it bounds every reference by
the committed size), so a full /dev/shm means a value not stored (counted in
``arena_full``; a failed commit is tried again only after 64 more), never a SIGBUS.

Allocation: one free list per block size in units (exact classes: a session's size hardly
changes, so a freed block is reused by the next session of its size), else the bump pointer
``top``, else a larger free block split, else, if enough was freed since the last time,
a rebuild (below: only once the units freed since the last one reach an eighth of the
slots and a sixteenth of what is committed, so that its O(slots) cost is amortised) and one
more try; failing all that the value is not stored (its session
stays a hit where it was set, like an oversize one).

Crash safety: the free lists are rebuilt from the slots. Every live block is named by the
reference word of exactly one whole slot; everything else below ``top`` is free. A holder
that died or raised mid-write (lock recovery, ``repair_locked``) may have left a list half
updated or a block leaked; the rebuild makes the lists exactly the gaps between the blocks
the slots reference (coalesced), so nothing leaks and nothing is handed out twice. A damaged
reference cannot make a reader leave the arena: readers bound it, and a damaged slot's bytes
fail its check word.

Arena control words (``ctl``), then one head word per block size::

    ctl+0 top: units handed out by the bump pointer      ctl+1 committed bytes of the arena
    ctl+2 live units (in blocks named by slots)           ctl+3 values not stored: no room
    ctl+4 rebuilds                                       ctl+5 units freed since the last rebuild
    ctl+6 the ctl+3 count at which a failed commit is tried again
    heads[n], n = 1 .. max units: unit + 1 of the first free block of n units (0: empty);
    a free block's first word holds the next one's unit + 1.

A reference word (in the slot record, covered by the slot's check word) is
``(unit + 1) << 32 | length``; 0 means "no value".
"""

from __future__ import annotations

from collections.abc import Callable

from .layout import U64, UNIT, Geometry, ref_units

CTL_TOP, CTL_COMMITTED, CTL_LIVE, CTL_FULL, CTL_REBUILDS, CTL_FREED, CTL_RETRY = range(7)
_STEP = 64 * 1024  # commit at least this much at a time (and a page multiple)
_MAX_STEP = 64 << 20  # and at most this much more than needed (fallocate holds the lock)
_RETRY_AFTER = 64  # values not stored before a failed commit is tried again
_PAGE = 4096


def _round_page(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


class Arena:
    """The value arena of one segment (``words``: the segment as u64 words)."""

    def __init__(
        self,
        words: memoryview,
        geometry: Geometry,
        commit: Callable[[int, int], bool],
        rebuild: Callable[[], object],
    ) -> None:
        g = geometry
        self.words = words
        self._ctl = g.arena_ctl_offset // 8
        self._heads = self._ctl + 8  # heads[n] at _heads + n
        self._base = g.arena_offset
        self._base_w = g.arena_offset // 8
        self._size = g.arena_bytes
        self._max_units = g.max_units
        self._phys = g.physical_slots
        self._commit = commit  # (offset, length) -> reserved?
        self._rebuild = rebuild  # the table's: it knows which slots name which blocks

    # -- reading (lock-free) ---------------------------------------------------------------

    def span(self, ref: int, value_size: int) -> tuple[int, int] | None:
        """``(byte offset in the segment, length)`` of a reference, or None if it cannot be
        one (outside what was committed, longer than ``value_size``): a torn or damaged
        slot, which then reads as a miss."""
        unit, length = (ref >> 32) - 1, ref & 0xFFFFFFFF
        if unit < 0 or length > value_size:
            return None
        if unit * UNIT + length > min(self.words[self._ctl + CTL_COMMITTED], self._size):
            return None
        return self._base + unit * UNIT, length

    def offset_of(self, ref: int) -> int:
        """Byte offset in the segment of a reference just allocated (trusted: ours)."""
        return self._base + ((ref >> 32) - 1) * UNIT

    # -- allocation (caller holds the lock) ---------------------------------------------------

    def alloc_locked(self, length: int) -> int:
        """A reference for a value of ``length`` bytes, or 0 if there is no room. The caller
        copies the value to ``span(ref)`` before it publishes the reference."""
        n = ref_units(length)
        w = self.words
        top, committed = w[self._ctl + CTL_TOP], w[self._ctl + CTL_COMMITTED]
        if committed > self._size or top * UNIT > committed or (
            committed % _PAGE and committed != self._size
        ):
            self._repair_ctl_locked()  # words no allocator wrote: damage
        unit = self._take_locked(n, split=False)
        if unit < 0:
            unit = self._alloc_slow_locked(n)
            if unit < 0:
                return 0
        w[self._ctl + CTL_LIVE] = (w[self._ctl + CTL_LIVE] + n) & U64
        return (unit + 1) << 32 | length

    def _take_locked(self, n: int, split: bool) -> int:
        """A free block of ``n`` units, else the bump pointer within what is committed,
        else (``split``) a larger free block split; -1 if none."""
        unit = self._pop_locked(n)
        if unit < 0:
            w = self.words
            top = w[self._ctl + CTL_TOP]
            if (top + n) * UNIT <= w[self._ctl + CTL_COMMITTED]:
                w[self._ctl + CTL_TOP] = top + n
                return int(top)
            if split:
                unit = self._split_locked(n)
        return unit

    def _repair_ctl_locked(self) -> None:
        w, ctl = self.words, self._ctl
        committed = min(w[ctl + CTL_COMMITTED], self._size)
        if committed != self._size:
            committed -= committed % _PAGE  # whole pages were reserved, or the whole arena
        w[ctl + CTL_COMMITTED] = committed
        w[ctl + CTL_TOP] = 0
        self._rebuild()  # top, live and the lists again from the slots

    def _pop_locked(self, n: int) -> int:
        w = self.words
        h = self._heads + n
        head = w[h]
        if not head:
            return -1
        unit = head - 1
        top = w[self._ctl + CTL_TOP]
        nxt = w[self._base_w + unit * 2] if unit + n <= top else top + 1
        if nxt > top:  # a damaged list: forget it (the next rebuild finds its blocks again)
            w[h] = 0
            return -1
        w[h] = nxt
        return int(unit)

    def _alloc_slow_locked(self, n: int) -> int:
        """The bump pointer needs more committed pages, or the arena is full: commit, else
        split a larger free block, else rebuild once. A unit index, or -1 (counted)."""
        w, ctl = self.words, self._ctl
        top, committed = w[ctl + CTL_TOP], w[ctl + CTL_COMMITTED]
        need = (top + n) * UNIT
        if need <= self._size and w[ctl + CTL_FULL] >= w[ctl + CTL_RETRY]:
            grow = max(need - committed, _STEP, min(committed // 8, _MAX_STEP))
            new = min(self._size, _round_page(committed + grow))
            reserved = self._commit(self._base + committed, new - committed)
            if not reserved and min(self._size, _round_page(need)) < new:
                new = min(self._size, _round_page(need))  # just what this value needs
                reserved = self._commit(self._base + committed, new - committed)
            if reserved:
                w[ctl + CTL_COMMITTED] = new
                w[ctl + CTL_TOP] = top + n
                return int(top)
            w[ctl + CTL_RETRY] = (w[ctl + CTL_FULL] + _RETRY_AFTER) & U64
        unit = self._split_locked(n)
        freed = w[ctl + CTL_FREED]
        if unit < 0 and freed and freed >= max(self._phys // 8, w[ctl + CTL_COMMITTED] // 256):
            # Enough was freed since the last rebuild (an eighth of the slots, a sixteenth
            # of what is committed: its O(slots) cost amortised over as many frees, and a
            # full arena does not rebuild on every set): coalesce it, then one more try.
            self._rebuild()
            unit = self._take_locked(n, split=True)
        if unit < 0:
            w[ctl + CTL_FULL] = (w[ctl + CTL_FULL] + 1) & U64
        return unit

    def _split_locked(self, n: int) -> int:
        """The first free block larger than ``n`` units: its head ``n`` units, the rest freed."""
        w, first = self.words, self._heads + n + 1
        sizes = w[first : self._heads + self._max_units + 1].tolist()
        for i, head in enumerate(sizes):
            if head:
                m = n + 1 + i
                unit = self._pop_locked(m)
                if unit >= 0:
                    self._push_locked(unit + n, m - n)
                    return unit
        return -1

    def free_locked(self, ref: int) -> None:
        """Give a slot's block back (the slot no longer names it). A reference that cannot
        be one of ours (damage) is ignored: at worst a leak, which the next rebuild ends."""
        if not ref:
            return
        unit, length = (ref >> 32) - 1, ref & 0xFFFFFFFF
        n = ref_units(length)
        w = self.words
        top = w[self._ctl + CTL_TOP]
        limit = min(w[self._ctl + CTL_COMMITTED], self._size)
        if unit < 0 or n > self._max_units or unit + n > top or top * UNIT > limit:
            return
        self._push_locked(unit, n)
        w[self._ctl + CTL_LIVE] = max(0, w[self._ctl + CTL_LIVE] - n)
        w[self._ctl + CTL_FREED] = (w[self._ctl + CTL_FREED] + n) & U64

    def _push_locked(self, unit: int, n: int) -> None:
        w, h = self.words, self._heads + n
        w[self._base_w + unit * 2] = w[h]
        w[h] = unit + 1

    # -- rebuild and clear --------------------------------------------------------------

    def rebuild_locked(self, refs: list[tuple[int, int]], drop: Callable[[int], None]) -> None:
        """Make the free lists the gaps between the live blocks. ``refs``: (slot, ref) of
        every slot that names a block; a reference outside the arena or overlapping another
        one is damage: ``drop(slot)`` empties that slot (without freeing: it owns nothing)."""
        w, ctl = self.words, self._ctl
        committed_units = min(w[ctl + CTL_COMMITTED], self._size) // UNIT
        blocks = []
        for slot, ref in refs:
            unit, length = (ref >> 32) - 1, ref & 0xFFFFFFFF
            n = ref_units(length)
            if unit < 0 or n > self._max_units or unit + n > committed_units:
                drop(slot)
            else:
                blocks.append((unit, n, slot))
        blocks.sort()
        self._zero_heads_locked()
        pos = live = 0
        for unit, n, slot in blocks:
            if unit < pos:
                drop(slot)  # overlaps the block before it: two slots cannot share bytes
                continue
            self._free_range_locked(pos, unit - pos)
            pos, live = unit + n, live + n
        w[ctl + CTL_TOP] = pos  # the free tail goes back to the bump pointer
        w[ctl + CTL_LIVE] = live
        w[ctl + CTL_FREED] = 0
        w[ctl + CTL_REBUILDS] = (w[ctl + CTL_REBUILDS] + 1) & U64

    def _free_range_locked(self, unit: int, count: int) -> None:
        while count > 0:
            n = min(count, self._max_units)
            self._push_locked(unit, n)
            unit, count = unit + n, count - n

    def _zero_heads_locked(self) -> None:
        first, count = self._heads + 1, self._max_units
        self.words[first : first + count] = memoryview(bytes(8 * count)).cast("Q")

    def clear_locked(self) -> None:
        """Every block free (the caller emptied every slot). Committed pages stay reserved."""
        w, ctl = self.words, self._ctl
        self._zero_heads_locked()
        w[ctl + CTL_TOP] = 0
        w[ctl + CTL_LIVE] = 0
        w[ctl + CTL_FREED] = 0

    def problems_locked(self, named: list[tuple[int, int, int]]) -> list[str]:
        """What is inconsistent between the slots' blocks ``named`` ((unit, units, slot) of
        every whole entry) and the allocator: overlaps, blocks past ``top``, the live count,
        free blocks lost or listed twice. ``[]`` when whole (what every rebuild leaves)."""
        w, ctl = self.words, self._ctl
        top = int(w[ctl + CTL_TOP])
        problems = []
        if top * UNIT > min(w[ctl + CTL_COMMITTED], self._size):
            problems.append(f"arena: top ({top} units) past the committed pages")
            top = min(w[ctl + CTL_COMMITTED], self._size) // UNIT  # walk no further
        live = sum(n for _, n, _ in named)
        if live != w[ctl + CTL_LIVE]:
            problems.append(f"arena: {live} units in use, but the live count is "
                            f"{int(w[ctl + CTL_LIVE])}")
        blocks = [(unit, n, f"slot {slot}") for unit, n, slot in named]
        steps = 0
        for n in range(1, self._max_units + 1):
            head = w[self._heads + n]
            while head and steps <= top:
                unit = head - 1
                blocks.append((unit, n, f"free list {n}"))
                steps += 1
                head = w[self._base_w + unit * 2] if unit + n <= top else 0
        if steps > top:
            problems.append("arena: a free list loops")
        blocks.sort()
        end, last = 0, ""
        for unit, n, owner in blocks:
            if unit < end:
                problems.append(f"arena: the block of {owner} overlaps that of {last}")
            if unit + n > top:
                problems.append(f"arena: the block of {owner} ends past top ({top})")
            end, last = max(end, unit + n), owner
        used = sum(n for _, n, _ in blocks)
        if not problems and used < top:
            problems.append(f"arena: {top - used} units neither in use nor free (leaked)")
        return problems

    def stats(self) -> dict[str, int]:
        w, ctl = self.words, self._ctl
        return {
            "arena_bytes": self._size,
            "arena_committed_bytes": int(w[ctl + CTL_COMMITTED]),
            "value_bytes": int(w[ctl + CTL_LIVE]) * UNIT,
            "arena_full": int(w[ctl + CTL_FULL]),
            "arena_rebuilds": int(w[ctl + CTL_REBUILDS]),
        }

