"""The hash table algorithm, over any writable buffer (an mmap, or a bytearray in tests).

No OS call, no clock, no lock in here: the caller passes ``now_ms`` and, for every method
whose name ends in ``_locked``, holds the segment lock.

Algorithm: bounded-window open addressing. A tag's home slot is ``tag % N``; the tag lives
in the first free slot of ``[home, home + W)``. Lookups scan the whole window with one
C-level ``find`` over the contiguous tag array, so they never stop at an empty slot and a
removal simply zeroes its slot: there are no tombstones to pile up under churn, and every
probe touches at most ``W`` slots whatever the bytes in the segment say.

Lock-free reads (why a reader never accepts half a slot): a writer copies the value into a
block of the arena (``arena.py``), stores the tag, meta and the block's reference, then the
new check word last (see ``layout``), whose low 40 bits are a keyed hash of
tag|meta|user|fingerprint|reference|value. A reader copies the slot and accepts
it only if those bits match the hash of the bytes it read. A copy that mixes two writes (or
a write cut short by a SIGKILL) matches only by a 2**-40 accident, whatever order the CPU
makes the loads and stores visible in. A reader that already knows a slot (the per-process
map of the cache) compares the single check word: check words are unique per write (the
meta holds bits 0-19 of the lock generation and the check's top 24 bits hold bits 20-43),
so an equal check word means "unchanged since" until 2**44 more writes have been made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import xxhash

from .arena import Arena
from .audit import TableAudit
from .layout import (
    CHECK_HASH_BITS,
    CHECK_HASH_MASK,
    EXPIRY_BITS,
    MAX_EXPIRY_MS,
    NONCE_BITS,
    NONCE_MASK,
    OP_CLEAR,
    OP_NONE,
    OP_SLOT,
    STAMP_MASK,
    TAG_SIZE,
    U64,
    W_EVICTIONS,
    W_JOURNAL,
    ZERO_TAG,
    Geometry,
)

_xxh128 = xxhash.xxh3_128_intdigest
_xxh64 = xxhash.xxh3_64_intdigest
_CLEAR_CHUNK = 1 << 20
_OP_SLOT_BITS = OP_SLOT << 56
_NO_REF = bytes(8)
_USER_SALT = 0x5553455273484D43  # user tags use another key than token tags
_FP_SALT = 0x4650524E54534D43  # fingerprints use another key than check words


def make_meta(expiry_ms: int, nonce: int) -> int:
    return (min(max(expiry_ms, 0), MAX_EXPIRY_MS) << NONCE_BITS) | (nonce & NONCE_MASK)


def meta_expiry_ms(meta: int) -> int:
    return meta >> NONCE_BITS


class Table(TableAudit):
    """Slots of one segment. ``buf`` must support the buffer protocol and ``find``."""

    def __init__(
        self,
        buf: Any,
        geometry: Geometry,
        tag_seed: int,
        check_seed: int,
        commit: Callable[[int, int], bool] | None = None,
    ) -> None:
        """``commit(offset, length)`` reserves arena pages before their first use (the
        segment's ``posix_fallocate``); a plain buffer needs none."""
        self.geometry = g = geometry
        self._buf = buf
        self.words = memoryview(buf).cast("B").cast("Q")
        self._tag_seed = tag_seed
        self._check_seed = check_seed
        self._nslots = g.nslots
        self._window = g.window
        self._phys = g.physical_slots
        self._tags = g.tags_offset
        self._checks_w = g.checks_offset // 8  # word index of slot 0's check
        self._users_w = g.users_offset // 8  # word index of slot 0's user
        self._rec_w = g.records_offset // 8  # word index of slot 0's meta
        self._rw = g.record_stride // 8  # words per record
        self._value_size = g.value_size
        self.arena: Arena | None = None
        if g.value_size:
            self.arena = Arena(
                self.words, g, commit or (lambda offset, length: True), self.rebuild_arena_locked
            )
        self._leases_w = g.leases_offset // 8
        self._lease_mask = g.lease_buckets - 1

    def release(self) -> None:
        """Drop the buffer view (an mmap cannot close while a view of it exists)."""
        self.words.release()

    # -- hashing -------------------------------------------------------------------------

    def tag_of(self, token: bytes) -> tuple[bytes, int]:
        """Keyed 128-bit tag of a token and its home slot. The token never reaches the table."""
        h = _xxh128(token, self._tag_seed) or 1  # an all-zero tag would read as an empty slot
        return h.to_bytes(TAG_SIZE, "little"), h % self._nslots

    def user_tag(self, user: str) -> int:
        """Keyed 64-bit tag of a user id (never 0: 0 means "no user"); never stored raw."""
        h: int = _xxh64(user.encode("utf-8", "surrogatepass"), self._tag_seed ^ _USER_SALT)
        return h or 1

    def home_of(self, tag: bytes) -> int:
        return int.from_bytes(tag, "little") % self._nslots

    def _checksum(self, tag: bytes, meta: int, user: int, value_area: bytes, fp: int = 0) -> int:
        """The hash half of a check word (its low 40 bits, never 0)."""
        words = (meta | user << 64 | fp << 128).to_bytes(24, "little")
        check: int = _xxh64(tag + words + value_area, self._check_seed)
        return (check & CHECK_HASH_MASK) or 1

    def check_word_index(self, slot: int) -> int:
        """Index in ``words`` of a slot's check: the one word a known-slot reader compares."""
        return self._checks_w + slot

    def fingerprint(self, encoding: bytes) -> int:
        """Keyed 64-bit fingerprint of a session's encoding (never 0: 0 means unknown)."""
        h: int = _xxh64(encoding, self._check_seed ^ _FP_SALT)
        return h or 1

    # -- leases ------------------------------------------------------------------------

    def lease_word(self, tag: bytes) -> int:
        """Index in ``words`` of the logout mark of ``tag``'s bucket."""
        return self._leases_w + (int.from_bytes(tag[8:], "little") & self._lease_mask)

    def user_lease_word(self, user: int) -> int:
        """Index in ``words`` of the logout mark of a user tag's bucket."""
        return self._leases_w + ((user >> 17) & self._lease_mask)

    def logout_mark_locked(self, word: int, gen: int) -> int:
        """The generation of the last logout marked in ``word``. A mark above the current
        generation ``gen`` cannot have been written by a logout (marks are generations, and
        generations only grow): it is damage, and would drop every set of its bucket
        forever, so it is reset. Caller holds the lock."""
        mark = int(self.words[word])
        if mark > gen:
            self.words[word] = 0
            return 0
        return mark

    # -- lock-free reads -----------------------------------------------------------------

    def find(self, tag: bytes, home: int) -> int:
        """Slot index holding ``tag`` in its window, or -1. Touches at most W slots."""
        base = self._tags
        start = base + home * TAG_SIZE
        end = start + self._window * TAG_SIZE
        buf = self._buf
        pos = buf.find(tag, start, end)
        while pos >= 0:
            rel = pos - base
            if not rel % TAG_SIZE:
                return int(rel // TAG_SIZE)
            pos = buf.find(tag, pos + 1, end)  # a match straddling two tags: keep looking
        return -1

    def read_slot(self, slot: int) -> tuple[bytes, int, int, bytes | None, int, int] | None:
        """A consistent copy ``(tag, meta, check, value, user, fingerprint)`` of a slot, or
        None if torn or invalid. ``value`` is None when the slot holds no value (hash-only
        mode or an oversize one); ``user`` is the user tag, 0 for none.
        """
        check = self.words[self._checks_w + slot]
        if not check:
            return None
        t = self._tags + slot * TAG_SIZE
        tag = bytes(self._buf[t : t + TAG_SIZE])
        meta = self.words[self._rec_w + slot * self._rw]
        fp = self.words[self._rec_w + slot * self._rw + 1]
        user = self.words[self._users_w + slot]
        area = b""
        value = None
        if self.arena is not None:
            ref = self.words[self._rec_w + slot * self._rw + 2]
            if ref:
                span = self.arena.span(ref, self._value_size)
                if span is None:
                    return None
                value = bytes(self._buf[span[0] : span[0] + span[1]])
                area = ref.to_bytes(8, "little") + value
            else:
                area = _NO_REF
        if self._checksum(tag, meta, user, area, fp) != check & CHECK_HASH_MASK:
            return None
        return tag, meta, check, value, user, fp

    def lookup(
        self, tag: bytes, home: int, now_ms: int
    ) -> tuple[int, int, int, bytes | None, int]:
        """``(slot, check, expiry_ms, value, fingerprint)`` of a live entry; raises KeyError
        on a miss.

        Lock-free; a slot being written, torn or damaged reads as a miss.
        """
        slot = self.find(tag, home)
        if slot < 0:
            raise KeyError(tag)
        snap = self.read_slot(slot)
        if snap is None or snap[0] != tag:
            raise KeyError(tag)
        _, meta, check, value, _, fp = snap
        expiry = meta >> NONCE_BITS
        if now_ms >= expiry:
            raise KeyError(tag)
        return slot, check, expiry, value, fp

    def check_of(self, slot: int) -> int:
        return int(self.words[self._checks_w + slot])

    # -- writes (caller holds the lock) --------------------------------------------------

    def store_locked(
        self,
        tag: bytes,
        home: int,
        meta: int,
        value: bytes | None,
        now_ms: int,
        stamp: int = 0,
        user: int = 0,
        fp: int = 0,
    ) -> tuple[int, int]:
        """Insert or overwrite ``tag``; returns ``(slot, check)``. Never fails for lack of room.

        Order of preference: the tag's own slot, an empty slot, expired or invalid slots
        (all of them in the window are reclaimed at once, to amortise the scan), and last
        the live entry that expires soonest (counted as an eviction).
        """
        # find() twice, inlined: this is the body of every set().
        buf, base = self._buf, self._tags
        start = base + home * TAG_SIZE
        end = start + self._window * TAG_SIZE
        pos = buf.find(tag, start, end)
        if pos >= 0 and (pos - base) % TAG_SIZE:
            slot = self.find(tag, home)
        else:
            slot = (pos - base) // TAG_SIZE if pos >= 0 else -1
        if slot < 0:
            pos = buf.find(ZERO_TAG, start, end)
            if pos >= 0 and not (pos - base) % TAG_SIZE:
                slot = (pos - base) // TAG_SIZE
            else:
                slot = self.find(ZERO_TAG, home)
                if slot < 0:
                    slot = self._reclaim_window_locked(home, now_ms)
        return slot, self._write_slot_locked(slot, tag, meta, value, stamp, user, fp)

    def _reclaim_window_locked(self, home: int, now_ms: int) -> int:
        """The window is full: reclaim every expired or invalid slot in it, else evict the
        entry that expires soonest. Reads the window's words with two C-level slices."""
        words, w = self.words, self._window
        checks = words[self._checks_w + home : self._checks_w + home + w].tolist()
        first_meta = self._rec_w + home * self._rw
        metas = words[first_meta : first_meta + w * self._rw : self._rw].tolist()
        # meta = expiry << 20 | nonce, so "expiry <= now" is "meta below this".
        threshold = (now_ms + 1) << NONCE_BITS
        if min(metas) < threshold or 0 in checks:
            free = [i for i in range(w) if metas[i] < threshold or not checks[i]]
            for i in free:
                self._zero_slot_locked(home + i)
            return home + free[0]
        words[W_EVICTIONS] = (words[W_EVICTIONS] + 1) & U64
        return home + metas.index(min(metas))

    def _write_slot_locked(
        self,
        slot: int,
        tag: bytes,
        meta: int,
        value: bytes | None,
        stamp: int = 0,
        user: int = 0,
        fp: int = 0,
    ) -> int:
        words = self.words
        mw = self._rec_w + slot * self._rw
        arena = self.arena
        old_ref = ref = 0
        if arena is not None:  # the value's block first: nothing names it yet
            if value is not None:
                ref = arena.alloc_locked(len(value))
                if ref:
                    start = arena.offset_of(ref)
                    self._buf[start : start + len(value)] = value
            # Read after the allocation: a rebuild inside it may have dropped this slot
            # (damaged), giving its block back already.
            old_ref = words[mw + 2]
        words[W_JOURNAL] = _OP_SLOT_BITS | slot
        cw = self._checks_w + slot
        # No "check = 0" first: until the new check lands, a reader that copies the slot
        # sees bytes that do not match the old check (a miss), and a reader that compares
        # only the check word sees the old entry, which is still the latest complete write.
        t = self._tags + slot * TAG_SIZE
        self._buf[t : t + TAG_SIZE] = tag
        words[mw] = meta
        words[mw + 1] = fp
        words[self._users_w + slot] = user
        mu = (meta | user << 64 | fp << 128).to_bytes(24, "little")
        if arena is not None:
            words[mw + 2] = ref
            area = ref.to_bytes(8, "little") + value if ref and value is not None else _NO_REF
            check = _xxh64(tag + mu + area, self._check_seed)
        else:
            check = _xxh64(tag + mu, self._check_seed)
        check = (stamp & STAMP_MASK) << CHECK_HASH_BITS | ((check & CHECK_HASH_MASK) or 1)
        words[cw] = check
        if arena is not None and old_ref:
            arena.free_locked(old_ref)  # after the new check: nothing names it any more
        return check

    def _zero_slot_locked(self, slot: int) -> None:
        words = self.words
        words[W_JOURNAL] = _OP_SLOT_BITS | slot
        words[self._checks_w + slot] = 0
        t = self._tags + slot * TAG_SIZE
        self._buf[t : t + TAG_SIZE] = ZERO_TAG
        mw = self._rec_w + slot * self._rw
        words[mw] = 0
        words[mw + 1] = 0
        words[self._users_w + slot] = 0
        if self.arena is not None:
            ref = words[mw + 2]
            words[mw + 2] = 0
            self.arena.free_locked(ref)

    def remove_locked(self, tag: bytes, home: int) -> bool:
        """Remove ``tag``, every copy in the window (a damaged segment may hold two); True
        if it was there."""
        slot = self.find(tag, home)
        found = slot >= 0
        while slot >= 0:
            self._zero_slot_locked(slot)
            slot = self.find(tag, home)
        return found

    def drop_damaged_locked(self, slots: list[int]) -> int:
        """Zero those of ``slots`` that are still not whole entries; returns how many."""
        dropped = 0
        for slot in slots:
            if self.slot_problem(slot) is not None:
                self._zero_slot_locked(slot)
                dropped += 1
        return dropped

    def remove_user_locked(self, user: int, now_ms: int) -> int:
        """Remove every slot whose user tag is ``user``; returns how many were live.

        One C-level ``find`` over the dense user array per match: the scan costs about a
        microsecond per 8 KiB of table, whatever the number of live sessions.
        """
        needle = user.to_bytes(8, "little")
        base = self._users_w * 8
        end = base + 8 * self._phys
        buf, words = self._buf, self.words
        threshold = (now_ms + 1) << NONCE_BITS
        live = 0
        pos = buf.find(needle, base, end)
        while pos >= 0:
            if (pos - base) % 8:
                pos = buf.find(needle, pos + 1, end)  # straddles two words: not a match
                continue
            slot = (pos - base) // 8
            if words[self._checks_w + slot] and words[self._rec_w + slot * self._rw] >= threshold:
                live += 1
            self._zero_slot_locked(slot)
            pos = buf.find(needle, pos + 8, end)
        return live

    def clear_locked(self) -> None:
        """Empty every slot. Journaled, so a holder killed half-way is finished by recovery."""
        words = self.words
        words[W_JOURNAL] = OP_CLEAR << 56
        # Checks first: from the first zeroed check on, those slots read as misses. Values
        # are left as they are: a zero check already makes them unreadable.
        self._zero_words(self._checks_w, 1)
        self._zero_words(self._tags // 8, 1, self._phys * TAG_SIZE // 8)
        self._zero_words(self._users_w, 1)
        self._zero_words(self._rec_w, self._rw)
        self._zero_words(self._rec_w + 1, self._rw)
        if self.arena is not None:
            self._zero_words(self._rec_w + 2, self._rw)
            self.arena.clear_locked()
        words[W_JOURNAL] = OP_NONE

    def _zero_words(self, first: int, step: int, count: int | None = None) -> None:
        """Zero ``count`` words (default: one per slot) from ``first``, ``step`` apart."""
        count = self._phys if count is None else count
        zeros = memoryview(bytes(8 * min(count, _CLEAR_CHUNK))).cast("Q")
        done = 0
        while done < count:
            n = min(len(zeros), count - done)
            start = first + done * step
            self.words[start : start + n * step : step] = zeros[:n]
            done += n

    def purge_locked(self, start: int, stop: int, now_ms: int) -> int:
        """Reclaim expired, invalid and damaged slots in ``[start, stop)``; returns how many."""
        stop = min(stop, self._phys)
        if start >= stop:
            return 0
        words = self.words
        checks = words[self._checks_w + start : self._checks_w + stop].tolist()
        first_meta = self._rec_w + start * self._rw
        metas = words[first_meta : first_meta + (stop - start) * self._rw : self._rw].tolist()
        threshold = (now_ms + 1) << NONCE_BITS
        reclaimed = 0
        tags = self._tags
        for i, (check, meta) in enumerate(zip(checks, metas, strict=True)):
            if check and meta >= threshold and self.slot_problem(start + i) is None:
                continue  # a whole, live entry
            t = tags + (start + i) * TAG_SIZE
            if not check and not meta and self._buf[t : t + TAG_SIZE] == ZERO_TAG:
                continue  # already empty
            self._zero_slot_locked(start + i)
            reclaimed += 1
        return reclaimed


assert EXPIRY_BITS + NONCE_BITS == 64
