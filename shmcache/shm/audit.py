"""Checking a table: what ``check()``, ``purge`` and lock recovery need to find damage.

A mixin of ``Table`` (same layer: a plain buffer, no OS call, no clock, no lock), split out
so that each file reads in one sitting. The methods ending in ``_locked`` want the lock;
the others are lock-free and may see a racing writer's slot as suspicious (callers re-check
under the lock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .arena import Arena
from .layout import (
    JOURNAL_SLOT_MASK,
    NONCE_BITS,
    OP_CLEAR,
    OP_NONE,
    OP_SLOT,
    TAG_SIZE,
    W_JOURNAL,
    ZERO_TAG,
    ref_units,
)


class TableAudit:
    """Repair from the journal, and the inspection of slots (see the module docstring).
    What it uses of the table, declared here, is defined by ``Table``."""

    _buf: Any
    words: memoryview
    _tags: int
    _checks_w: int
    _users_w: int
    _rec_w: int
    _rw: int
    _phys: int
    _window: int
    find: Callable[[bytes, int], int]
    home_of: Callable[[bytes], int]
    read_slot: Callable[[int], Any]
    clear_locked: Callable[[], None]
    _zero_slot_locked: Callable[[int], None]
    arena: Arena | None

    def damaged_copies(self, tag: bytes, home: int) -> list[int]:
        """Slots of the window holding a damaged copy of ``tag``: one whose tag still
        matches ours in one half (any damage shorter than 9 bytes) but is not a whole entry.

        A logout that does not find its tag calls this: the tag may have been damaged in
        place while some process still trusts that slot's check word. Two C-level finds,
        then a checksum for the (rare) candidates; lock-free, so re-check the result with
        ``drop_damaged_locked``.
        """
        buf, base = self._buf, self._tags
        start = base + home * TAG_SIZE
        end = start + self._window * TAG_SIZE
        candidates = set()
        for half, offset in ((tag[:8], 0), (tag[8:], 8)):
            pos = buf.find(half, start + offset, end)
            while pos >= 0:
                if (pos - base - offset) % TAG_SIZE == 0:
                    candidates.add((pos - base - offset) // TAG_SIZE)
                pos = buf.find(half, pos + 1, end)
        return sorted(s for s in candidates if self.slot_problem(s) is not None)

    def repair_locked(self) -> list[str]:
        """Finish or undo what a dead lock holder was doing, from the journal."""
        words = self.words
        journal = words[W_JOURNAL]
        op, slot = journal >> 56, journal & JOURNAL_SLOT_MASK
        done: list[str] = []
        if op == OP_CLEAR:
            self.clear_locked()
            done.append("finished an interrupted clear")
        elif op == OP_SLOT and slot < self._phys:
            if self.slot_problem(slot) is not None:  # half-written, or half-zeroed
                self._zero_slot_locked(slot)
                done.append(f"dropped half-written slot {slot}")
        elif op != OP_NONE:
            done.append(f"ignored an unreadable journal word {journal:#x}")
        words[W_JOURNAL] = OP_NONE
        # The holder may have died inside the value allocator (a free list half updated, a
        # block handed out but never named): rebuild it from the slots (see arena.py).
        self.rebuild_arena_locked()
        return done

    def _drop_slot_keeping_block_locked(self, slot: int) -> None:
        """Empty a slot whose reference is damage (a rebuild found it): its block is not
        its own, so nothing is freed."""
        self.words[self._rec_w + slot * self._rw + 2] = 0
        self._zero_slot_locked(slot)

    def rebuild_arena_locked(self) -> None:
        """Rebuild the arena's free lists from the references of the slots (see arena.py)."""
        if self.arena is None:
            return
        words, phys = self.words, self._phys
        checks = words[self._checks_w : self._checks_w + phys].tolist()
        first = self._rec_w + 2
        refs = words[first : first + phys * self._rw : self._rw].tolist()
        named = []
        for slot, ref in enumerate(refs):
            if not ref:
                continue
            # A slot that is not a whole entry (a write that never finished, damage) does
            # not own its reference: dropped here, as purge would, so it holds no block.
            if checks[slot] and self.read_slot(slot) is not None:
                named.append((slot, ref))
            else:
                self._drop_slot_keeping_block_locked(slot)
        self.arena.rebuild_locked(named, self._drop_slot_keeping_block_locked)
        words[W_JOURNAL] = OP_NONE  # the drops above were journaled, and are complete

    # -- inspection ----------------------------------------------------------------------

    def slot_problem(self, slot: int) -> str | None:
        """What is wrong with one slot, or None (empty or a whole, well-placed entry)."""
        t = self._tags + slot * TAG_SIZE
        tag = bytes(self._buf[t : t + TAG_SIZE])
        check = self.words[self._checks_w + slot]
        if tag == ZERO_TAG:
            words = self.words
            mw = self._rec_w + slot * self._rw
            if check or any(words[mw : mw + self._rw].tolist()) or words[self._users_w + slot]:
                return f"slot {slot}: empty tag but leftover check, meta, reference or user words"
            return None
        if not check:
            return f"slot {slot}: tag without a check (a write that never finished)"
        if self.read_slot(slot) is None:
            return f"slot {slot}: check does not match the slot's bytes (torn or damaged)"
        home = self.home_of(tag)
        if not home <= slot < home + self._window:
            return f"slot {slot}: entry outside its probe window (home {home})"
        return None

    def problems(self) -> list[int]:
        """Slots that look damaged in a lock-free pass (a racing writer may cause false alarms;
        the caller re-checks these under the lock)."""
        bad: list[int] = []
        seen: dict[bytes, int] = {}
        buf, tags = self._buf, self._tags
        checks = self.words[self._checks_w : self._checks_w + self._phys].tolist()
        for slot in range(self._phys):
            t = tags + slot * TAG_SIZE
            tag = bytes(buf[t : t + TAG_SIZE])
            if tag == ZERO_TAG and not checks[slot]:
                continue
            if tag in seen:
                bad.append(slot)
            seen[tag] = slot
            if self.slot_problem(slot) is not None:
                bad.append(slot)
        return bad

    def duplicate_problem(self, slot: int) -> str | None:
        t = self._tags + slot * TAG_SIZE
        tag = bytes(self._buf[t : t + TAG_SIZE])
        if tag == ZERO_TAG:
            return None
        first = self.find(tag, self.home_of(tag))
        if 0 <= first != slot:
            return f"slot {slot}: same tag as slot {first}"
        return None

    def census(self, now_ms: int) -> dict[str, int]:
        """Counts of live, expired, empty and invalid slots (lock-free, approximate if busy)."""
        phys = self._phys
        checks = self.words[self._checks_w : self._checks_w + phys].tolist()
        metas = self.words[self._rec_w : self._rec_w + phys * self._rw : self._rw].tolist()
        threshold = (now_ms + 1) << NONCE_BITS
        live = expired = invalid = 0
        for check, meta in zip(checks, metas, strict=True):
            if not check:
                if meta:
                    invalid += 1
            elif meta >= threshold:
                live += 1
            else:
                expired += 1
        return {
            "entries": live,
            "expired": expired,
            "invalid": invalid,
            "empty": phys - live - expired - invalid,
        }

    def arena_problems_locked(self) -> list[str]:
        """The value arena's consistency with the slots (see ``Arena.problems_locked``)."""
        if self.arena is None:
            return []
        words, named = self.words, []
        for slot in range(self._phys):
            ref = words[self._rec_w + slot * self._rw + 2]
            if ref and words[self._checks_w + slot] and self.read_slot(slot) is not None:
                named.append(((ref >> 32) - 1, ref_units(ref & 0xFFFFFFFF), slot))
        return self.arena.problems_locked(named)

    def journal(self) -> tuple[int, int]:
        j = self.words[W_JOURNAL]
        return j >> 56, j & JOURNAL_SLOT_MASK
