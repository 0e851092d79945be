"""The value arena (shmcache/shm/arena.py): values of any size up to value_size, memory that
follows the sessions stored, an allocator that stays consistent with the slots.

Table-level tests run on a plain buffer; the memory tests on a real segment (st_blocks of
the /dev/shm file: what the kernel really allocated)."""

from __future__ import annotations

import os
import pickle
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from pydantic import BaseModel

from shmcache import PydanticCodec, SharedMemorySessionCache
from shmcache.shm import fast
from shmcache.shm.layout import Geometry, ref_units
from shmcache.shm.segment import segment_path
from shmcache.shm.table import Table, make_meta

NOW = 1_000_000
FAR = 10_000_000


class Session(BaseModel):
    """The seed's session model."""

    id: int
    token: str
    created_at: str
    expires_at: str


def seed_session(i: int) -> Session:
    """A session shaped like the field's: a 43-character url-safe token, ISO timestamps."""
    return Session(id=i, token=f"{i:08d}" + "q" * 35, created_at="2026-11-29T10:00:00.123456",
                   expires_at="2026-12-29T10:00:00.123456")


def table(capacity: int, value_size: int, commit=None) -> Table:  # type: ignore[no-untyped-def]
    geo = Geometry.for_capacity(capacity, value_size)
    return Table(bytearray(geo.size), geo, 1234, 5678, commit)


def put(t: Table, token: bytes, value: bytes | None, expiry: int = FAR) -> int:
    tag, home = t.tag_of(token)
    return t.store_locked(tag, home, make_meta(expiry, 1), value, NOW)[0]


def got(t: Table, token: bytes) -> bytes | None:
    tag, home = t.tag_of(token)
    return t.lookup(tag, home, NOW)[3]


def drop(t: Table, token: bytes) -> None:
    t.remove_locked(*t.tag_of(token))


def blocks_in_use(t: Table) -> int:
    assert t.arena is not None
    return t.arena.stats()["value_bytes"]


# -- sizes ---------------------------------------------------------------------------------


def test_a_value_takes_its_own_size_not_value_size() -> None:
    t = table(100, 4096)
    for i, size in enumerate([1, 15, 16, 17, 351, 4096]):
        put(t, b"tok%d" % i, b"v" * size)
    assert blocks_in_use(t) == 16 * sum(ref_units(n) for n in [1, 15, 16, 17, 351, 4096])
    assert got(t, b"tok4") == b"v" * 351
    assert t.arena_problems_locked() == []


def test_an_overwrite_frees_the_old_block_and_reuses_it() -> None:
    t = table(100, 1024)
    put(t, b"a", b"x" * 300)
    for i in range(50):  # the same size again and again: one block's worth stays in use
        put(t, b"a", bytes([i]) * 300)
    assert blocks_in_use(t) == 16 * ref_units(300)
    assert t.arena is not None and t.arena.stats()["arena_committed_bytes"] == 64 * 1024
    assert got(t, b"a") == bytes([49]) * 300
    drop(t, b"a")
    assert blocks_in_use(t) == 0
    assert t.arena_problems_locked() == []


def test_no_room_stores_the_entry_without_its_value_and_counts_it() -> None:
    """/dev/shm full (posix_fallocate refused): the session is stored without its value,
    as an oversize one: a miss elsewhere, never an error, never a SIGBUS."""
    calls = []

    def refuse(offset: int, length: int) -> bool:
        calls.append((offset, length))
        return False

    t = table(100, 512, refuse)
    slot = put(t, b"a", b"x" * 200)
    assert calls and got(t, b"a") is None
    assert t.slot_problem(slot) is None  # a whole entry, without a value
    assert t.arena is not None and t.arena.stats()["arena_full"] == 1
    assert t.arena_problems_locked() == []


def test_freed_blocks_of_other_sizes_are_coalesced_when_the_arena_is_full() -> None:
    """Small sessions freed, then larger ones: the bump pointer is at the end of what may be
    committed, so the allocator splits, and failing that rebuilds (coalesces) the free
    space. Without the rebuild, not one large value fits (checked by breaking it)."""
    limit = 8192  # /dev/shm lets this arena have 8 KiB

    def commit(offset: int, length: int) -> bool:
        return False  # nothing more after the first step, given below

    t = table(256, 256, commit)
    assert t.arena is not None
    t.words[t.arena._ctl + 1] = limit  # committed: as if the first 8 KiB had been reserved
    small = [b"s%d" % i for i in range(limit // 16)]
    for tok in small:
        put(t, tok, b"1" * 16)  # one unit each: the whole 8 KiB
    for tok in small:
        drop(t, tok)
    assert blocks_in_use(t) == 0
    for i in range(limit // 256):
        put(t, b"L%d" % i, b"2" * 256)
        assert got(t, b"L%d" % i) == b"2" * 256
    assert t.arena.stats()["arena_rebuilds"] == 1
    assert t.arena.stats()["arena_full"] == 0
    assert t.arena_problems_locked() == []


def test_clear_frees_everything() -> None:
    t = table(100, 512)
    for i in range(60):
        put(t, b"t%d" % i, b"v" * (i * 7 % 512))
    t.clear_locked()
    assert blocks_in_use(t) == 0
    assert t.arena is not None and t.arena.stats()["arena_committed_bytes"] > 0
    put(t, b"again", b"w" * 100)
    assert got(t, b"again") == b"w" * 100
    assert t.arena_problems_locked() == []


def test_a_damaged_reference_reads_as_a_miss_and_is_dropped_by_the_rebuild() -> None:
    t = table(100, 512)
    slot = put(t, b"a", b"v" * 100)
    put(t, b"b", b"w" * 100)
    ref_word = t._rec_w + slot * t._rw + 2
    for bad in [(1 << 63) | 100, (5 << 32) | 100, (1 << 32) | 4000]:
        t.words[ref_word] = bad
        assert t.read_slot(slot) is None  # out of bounds, overlapping, too long: a miss
    t.rebuild_arena_locked()
    assert t.slot_problem(slot) is None and got(t, b"b") == b"w" * 100
    assert t.arena_problems_locked() == []
    assert blocks_in_use(t) == 16 * ref_units(100)


# -- the allocator against a model ---------------------------------------------------------


class ArenaMachine(RuleBasedStateMachine):
    """Sets of random sizes, overwrites, removals, clears, rebuilds, a commit that sometimes
    refuses: every value read back is the last one stored for its token (or None where it
    could not be stored), and the allocator always agrees with the slots."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = False
        self.t = table(32, 600, lambda offset, length: not self.refusing)
        self.model: dict[bytes, bytes | None] = {}

    @rule(i=st.integers(0, 40), size=st.sampled_from([0, 1, 15, 16, 17, 100, 351, 599, 600]),
          fill=st.integers(0, 255))
    def set(self, i: int, size: int, fill: int) -> None:
        tok = b"tok%d" % i
        value = bytes([fill]) * size
        put(self.t, tok, value)
        self.model[tok] = value if got(self.t, tok) is not None else None
        # (A full table evicts: a token may be gone, which the invariant allows.)

    @rule(i=st.integers(0, 40))
    def remove(self, i: int) -> None:
        drop(self.t, b"tok%d" % i)
        self.model.pop(b"tok%d" % i, None)

    @rule()
    def clear(self) -> None:
        self.t.clear_locked()
        self.model.clear()

    @rule()
    def rebuild(self) -> None:
        self.t.rebuild_arena_locked()

    @rule(refusing=st.booleans())
    def dev_shm(self, refusing: bool) -> None:
        self.refusing = refusing

    @invariant()
    def reads_match_and_allocator_agrees(self) -> None:
        in_use = 0
        for tok, value in self.model.items():
            tag, home = self.t.tag_of(tok)
            try:
                stored = self.t.lookup(tag, home, NOW)[3]
            except KeyError:
                continue  # evicted
            assert stored == value
            in_use += 0 if stored is None else 16 * ref_units(len(stored))
        assert self.t.arena_problems_locked() == []
        assert blocks_in_use(self.t) >= in_use


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


# -- memory on a real segment --------------------------------------------------------------


def allocated(name: str) -> int:
    return os.stat(segment_path(name)).st_blocks * 512


@pytest.mark.parametrize("codec", ["pickle", "pydantic"])
def test_memory_grows_with_the_sessions_encoded_sizes(segment_name: str, codec: str) -> None:
    """The seed's Session, value_size=4096: what /dev/shm allocates per session stored is
    its encoding plus at most 64 bytes, not value_size (the table's own fixed part is paid
    at creation, whatever the sessions weigh)."""
    chosen = PydanticCodec(Session) if codec == "pydantic" else None
    n = 4000
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=n, value_size=4096, codec=chosen
    )
    try:
        empty = allocated(segment_name)
        assert cache.stats()["committed_bytes"] == empty
        sessions = [seed_session(i) for i in range(n)]
        for i, s in enumerate(sessions):
            cache.set(f"tok-{i}", s, 600)
        encoded = len(chosen.encode(sessions[0]) if chosen else pickle.dumps(
            sessions[0], pickle.HIGHEST_PROTOCOL))
        per_session = (allocated(segment_name) - empty) / n
        assert encoded <= per_session <= encoded + 64, (encoded, per_session)
        stats = cache.stats()
        assert stats["committed_bytes"] == allocated(segment_name)
        assert stats["oversize"] == stats["arena_full"] == 0
        # The same sessions with value areas of value_size in every slot (layout 4) took
        # (4096 + 8) x 2 per session: now the whole segment is a fraction of that.
        assert allocated(segment_name) < n * 4096 / 4
        other = SharedMemorySessionCache.attach(segment_name, codec=chosen)
        try:
            i = random.randrange(n)
            assert other.get(f"tok-{i}") == sessions[i]
        finally:
            other.close()
    finally:
        cache.close()


# -- a full /dev/shm, and damage (an adversarial review's cases) ----------------------------


def test_a_full_dev_shm_neither_rebuilds_nor_retries_on_every_set() -> None:
    """/dev/shm full from the start: each set used to retry posix_fallocate (which, on
    tmpfs, briefly takes every free page) and rebuild the whole arena, lock held."""
    calls = []

    def refuse(offset: int, length: int) -> bool:
        calls.append(length)
        return False

    t = table(1000, 1024, refuse)
    for i in range(200):
        put(t, b"t%d" % i, b"v" * 300)
    assert t.arena is not None
    stats = t.arena.stats()
    assert stats["arena_full"] == 200 and stats["arena_rebuilds"] == 0
    assert len(calls) <= 2 * (1 + 200 // 64)  # a step, then just what is needed


def test_a_commit_that_fails_retries_with_just_what_is_needed() -> None:
    room = [64 * 1024 + 4096]  # the first 64 KiB step fits, the next one does not
    calls = []

    def commit(offset: int, length: int) -> bool:
        calls.append(length)
        if length > room[0]:
            return False
        room[0] -= length
        return True

    t = table(100_000, 4096, commit)
    assert t.arena is not None
    per_block = 16 * ref_units(300)
    for i in range(400):
        put(t, b"t%d" % i, b"v" * 300)
    # 64 KiB, then a refused 64 KiB step, then the one page this value needs: granted.
    assert calls[:3] == [64 * 1024, 64 * 1024, 4096]
    stored = (64 * 1024 + 4096) // per_block
    assert t.arena.stats()["arena_committed_bytes"] == 64 * 1024 + 4096
    assert t.arena.stats()["arena_full"] == 400 - stored
    assert len(calls) <= 3 + 2 * (1 + (400 - stored) // 64)


@pytest.mark.parametrize("pure", [True, False], ids=["python", "compiled"])
def test_a_garbage_free_list_head_is_forgotten(
    segment_name: str, pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head word whose unit + size wraps around 2**64: the compiled core once read
    outside the mapping from it. Both implementations now drop the list."""
    monkeypatch.setenv("SHMCACHE_PURE_PYTHON", "1" if pure else "0")
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=4096)
    try:
        if not pure and cache.stats()["implementation"] != "c":
            pytest.skip(f"{fast.UNAVAILABLE}: pip install -e . with a C compiler builds it")
        value = "x" * 3000
        n = ref_units(len(pickle.dumps(value, pickle.HIGHEST_PROTOCOL)))
        arena = cache._table.arena
        assert arena is not None
        cache._words[arena._heads + n] = (1 << 64) - n + 1
        cache.set("tok", value, 60)
        assert cache.get("tok") == value
        assert cache._words[arena._heads + n] == 0
        assert cache.check() == []
    finally:
        cache.close()


def test_check_survives_damaged_arena_words() -> None:
    t = table(100, 512)
    assert t.arena is not None
    put(t, b"a", b"v" * 100)
    ctl, heads = t.arena._ctl, t.arena._heads
    for top, head in [(1 << 62, 1 << 40), (1 << 40, 2)]:
        t.words[ctl] = top
        t.words[heads + 1] = head
        t.words[t.arena._base_w + 2] = head  # block 1 points at itself: a loop
        assert t.arena_problems_locked()  # reported, not raised, and it ends
    t.rebuild_arena_locked()  # the lock recovery's answer to such damage
    assert t.arena_problems_locked() == []


def test_a_rebuild_inside_an_overwrite_does_not_free_the_old_block_twice() -> None:
    """The slot being overwritten is damaged (its check no longer matches), and the
    allocation finds damaged control words and rebuilds, which drops that slot and gives
    its block back: the overwrite must not free it a second time."""
    t = table(100, 512)
    assert t.arena is not None
    slot = put(t, b"a", b"v" * 100)
    put(t, b"b", b"w" * 100)
    t.words[t.check_word_index(slot)] ^= 0x5A  # damaged: the rebuild drops this slot
    t.words[t.arena._ctl + 1] += 8  # committed: not a page multiple, so alloc rebuilds
    put(t, b"a", b"u" * 100)
    assert got(t, b"a") == b"u" * 100 and got(t, b"b") == b"w" * 100
    assert t.arena_problems_locked() == []
