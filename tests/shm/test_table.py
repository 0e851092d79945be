"""The table algorithm on a plain bytearray: no segment, no lock, no clock.

Every ``*_locked`` method is called directly (there is nobody to exclude). Tokens with a
chosen home slot are found by searching ``tag_of`` over numbered tokens.
"""

from __future__ import annotations

import random

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from shmcache.shm import layout as _layout
from shmcache.shm.layout import (
    JOURNAL_SLOT_MASK,
    OP_CLEAR,
    OP_NONE,
    OP_SLOT,
    TAG_SIZE,
    W_EVICTIONS,
    W_JOURNAL,
    Geometry,
)
from shmcache.shm.table import Table, make_meta, meta_expiry_ms

# The part of a check word that is the keyed hash (the rest may be a write stamp).
HASH_MASK = getattr(_layout, "CHECK_HASH_MASK", (1 << 64) - 1)
TAG_SEED = 0x0123_4567_89AB_CDEF
CHECK_SEED = 0x0FED_CBA9_8765_4321
NOW = 1_000_000  # ms
FAR = NOW + 10_000_000


class CountingBuffer(bytearray):
    """A bytearray that counts ``find`` calls: every probe must stay bounded."""

    finds = 0

    def find(self, *args: object) -> int:  # type: ignore[override]
        self.finds += 1
        return super().find(*args)  # type: ignore[arg-type]


def make_table(capacity: int, value_size: int = 0) -> tuple[Table, CountingBuffer]:
    geo = Geometry.for_capacity(capacity, value_size)
    buf = CountingBuffer(geo.size)
    return Table(buf, geo, TAG_SEED, CHECK_SEED), buf


def tokens_with_home(table: Table, home: int, n: int, prefix: str = "k") -> list[bytes]:
    found: list[bytes] = []
    i = 0
    while len(found) < n:
        tok = f"{prefix}-{home}-{i}".encode()
        if table.tag_of(tok)[1] == home:
            found.append(tok)
        i += 1
    return found


def store(table: Table, token: bytes, expiry: int, value: bytes | None = None,
          now: int = NOW, nonce: int = 1) -> int:
    tag, home = table.tag_of(token)
    slot, check = table.store_locked(tag, home, make_meta(expiry, nonce), value, now)
    assert check == table.check_of(slot) != 0
    return slot


def lookup(table: Table, token: bytes, now: int = NOW) -> tuple[int, int, int, bytes | None] | None:
    tag, home = table.tag_of(token)
    try:
        return table.lookup(tag, home, now)[:4]  # (the fingerprint is tested on its own)
    except KeyError:
        return None


def tag_at(table: Table, buf: bytearray, slot: int) -> bytes:
    t = table.geometry.tags_offset + slot * TAG_SIZE
    return bytes(buf[t : t + TAG_SIZE])


def meta_offset(table: Table, slot: int) -> int:
    """Byte offset of a slot's meta word (the value area follows it), from the layout."""
    g = table.geometry
    rec = g.records_offset + slot * g.record_stride
    # Layouts with a separate check array start a record with the meta; the older one had
    # the check first, then the meta.
    return rec if hasattr(g, "checks_offset") else rec + 8


def independent_check(table: Table, buf: bytearray, slot: int) -> bool:
    """Recompute a slot's checksum from its raw bytes, without the table's code."""
    g = table.geometry
    tag = tag_at(table, buf, slot)
    check = table.words[table.check_word_index(slot)]
    m = meta_offset(table, slot)
    meta = buf[m : m + 8]
    fingerprint = buf[m + 8 : m + 16]  # the record: meta, fingerprint, value reference
    area = b""
    if g.value_size:
        ref = int.from_bytes(buf[m + 16 : m + 24], "little")
        area = buf[m + 16 : m + 24]
        if ref:  # (unit + 1) << 32 | length, units of 16 bytes from the arena's start
            unit, length = (ref >> 32) - 1, ref & 0xFFFFFFFF
            if length > g.value_size:
                return False
            start = g.arena_offset + 16 * unit
            area += buf[start : start + length]
    u = g.users_offset + 8 * slot
    user = buf[u : u + 8]
    hashed = tag + meta + user + fingerprint + area
    digest = xxhash.xxh3_64_intdigest(hashed, CHECK_SEED) & HASH_MASK or 1
    return check != 0 and check & HASH_MASK == digest


# -- basics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value_size", [0, 64])
def test_store_lookup_remove_roundtrip(value_size: int) -> None:
    t, buf = make_table(64, value_size)
    toks = [f"tok-{i}".encode() for i in range(40)]
    vals = {tok: (b"v" * (i % 60) if value_size else None) for i, tok in enumerate(toks)}
    slots = {tok: store(t, tok, FAR + i, vals[tok]) for i, tok in enumerate(toks)}
    assert len(set(slots.values())) == len(toks)
    for i, tok in enumerate(toks):
        got = lookup(t, tok)
        assert got is not None
        slot, check, expiry, value = got
        assert slot == slots[tok]
        assert check == t.check_of(slot)
        assert expiry == FAR + i
        assert value == vals[tok]
        assert independent_check(t, buf, slot)
    assert t.census(NOW)["entries"] == 40
    assert t.problems() == []
    for tok in toks[::2]:
        tag, home = t.tag_of(tok)
        assert t.remove_locked(tag, home)
        assert not t.remove_locked(tag, home)
        assert lookup(t, tok) is None
    for tok in toks[1::2]:
        assert lookup(t, tok) is not None
    census = t.census(NOW)
    assert (census["entries"], census["invalid"], census["expired"]) == (20, 0, 0)
    assert t.problems() == []


def test_overwrite_keeps_slot_and_changes_check() -> None:
    t, _ = make_table(16, 32)
    slot = store(t, b"tok", FAR, b"one", nonce=1)
    first = t.check_of(slot)
    assert store(t, b"tok", FAR + 5, b"two", nonce=2) == slot
    assert t.check_of(slot) != first
    assert lookup(t, b"tok") == (slot, t.check_of(slot), FAR + 5, b"two")
    assert store(t, b"tok", FAR + 6, None, nonce=3) == slot
    assert lookup(t, b"tok") == (slot, t.check_of(slot), FAR + 6, None)
    assert t.census(NOW)["entries"] == 1


def test_expiry_boundary() -> None:
    t, _ = make_table(16)
    store(t, b"tok", NOW + 300)
    assert lookup(t, b"tok", NOW + 299) is not None
    assert lookup(t, b"tok", NOW + 300) is None
    assert meta_expiry_ms(make_meta(NOW + 300, 7)) == NOW + 300


# -- full windows --------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [8, 100])
def test_full_window_evicts_soonest_expiring(capacity: int) -> None:
    t, _ = make_table(capacity)
    w = t.geometry.window
    toks = tokens_with_home(t, 3, w + 1)
    expiries = list(range(FAR, FAR + w))
    random.Random(capacity).shuffle(expiries)
    for tok, exp in zip(toks[:w], expiries, strict=True):
        store(t, tok, exp)
    assert t.words[W_EVICTIONS] == 0
    assert t.census(NOW)["entries"] == w
    soonest = toks[expiries.index(min(expiries))]
    store(t, toks[-1], FAR + 10 * w)
    assert t.words[W_EVICTIONS] == 1
    assert lookup(t, soonest) is None
    for tok in toks:
        assert (lookup(t, tok) is None) == (tok == soonest)
    assert t.problems() == []


@pytest.mark.parametrize("capacity", [8, 100])
def test_expired_and_invalid_slots_reclaimed_before_evicting(capacity: int) -> None:
    t, buf = make_table(capacity)
    w = t.geometry.window
    toks = tokens_with_home(t, 0, w + 1)
    slots = [store(t, tok, FAR + i) for i, tok in enumerate(toks[:w])]
    assert sorted(slots) == list(range(w))
    dead = {1, 4, w - 1}
    for i in dead:
        store(t, toks[i], NOW - 5)  # already expired
    t.words[t.check_word_index(slots[2])] = 0  # a write that never finished: invalid
    assert t.census(NOW)["expired"] == len(dead)
    assert t.census(NOW)["invalid"] == 1
    store(t, toks[-1], FAR)
    assert t.words[W_EVICTIONS] == 0
    census = t.census(NOW)
    assert (census["expired"], census["invalid"]) == (0, 0)
    assert census["entries"] == w - len(dead) - 1 + 1
    for i, tok in enumerate(toks[:w]):
        assert (lookup(t, tok) is None) == (i in dead or i == 2)
    assert lookup(t, toks[-1]) is not None
    assert t.problems() == []
    for i in dead | {2}:  # reclaimed slots are empty again (or reused by the new key)
        assert tag_at(t, buf, slots[i]) in (bytes(TAG_SIZE), t.tag_of(toks[-1])[0])


@pytest.mark.parametrize("capacity", [8, 100])
def test_last_home_slots_spill_into_overflow(capacity: int) -> None:
    t, buf = make_table(capacity)
    g = t.geometry
    last = g.nslots - 1
    toks = tokens_with_home(t, last, g.window + 1)
    slots = [store(t, tok, FAR + i) for i, tok in enumerate(toks[:-1])]
    assert sorted(slots) == list(range(last, g.physical_slots))
    for s in range(last):  # nothing wrapped around to the start of the table
        assert tag_at(t, buf, s) == bytes(TAG_SIZE)
    for tok in toks[:-1]:
        assert lookup(t, tok) is not None
    store(t, toks[-1], FAR + 1000)
    assert t.words[W_EVICTIONS] == 1
    assert lookup(t, toks[0]) is None  # the soonest to expire
    assert lookup(t, toks[-1]) is not None
    for s in range(last):
        assert tag_at(t, buf, s) == bytes(TAG_SIZE)
    # a key homed at slot 0 does not see them, and is not disturbed by them
    zero = tokens_with_home(t, 0, 1)[0]
    assert store(t, zero, FAR) == 0
    assert t.words[W_EVICTIONS] == 1
    assert t.problems() == []


# -- garbage -----------------------------------------------------------------------------------


def _fill(t: Table, buf: bytearray, mode: str, rng: random.Random) -> None:
    g = t.geometry
    start, size = g.tags_offset, g.size - g.tags_offset
    tags_end = start + TAG_SIZE * g.physical_slots
    if mode == "random":
        buf[start:] = rng.randbytes(size)
    elif mode == "ones":
        buf[start:] = b"\xff" * size
    elif mode == "misaligned-tag":
        # the tag of "victim" at every slot, shifted so that no copy is aligned
        tag, _ = t.tag_of(b"victim")
        shift = rng.randrange(1, TAG_SIZE)
        pattern = (tag * (g.physical_slots + 1))[TAG_SIZE - shift :]
        buf[start:tags_end] = pattern[: tags_end - start]
        buf[tags_end:] = rng.randbytes(g.size - tags_end)
    else:  # "zero-straddle": 16-byte zero runs across tag boundaries, no empty tag
        pair = b"\x01" * 8 + b"\x00" * 16 + b"\x01" * 8
        ntags = g.physical_slots
        buf[start:tags_end] = (pair * ntags)[: ntags * TAG_SIZE]
        buf[tags_end:] = rng.randbytes(g.size - tags_end)
    t.words[W_JOURNAL] = rng.getrandbits(64)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.sampled_from([1, 8, 16, 100]),
    value_size=st.sampled_from([0, 24]),
    mode=st.sampled_from(["random", "ones", "misaligned-tag", "zero-straddle"]),
    seed=st.integers(0, 2**32),
)
def test_garbage_never_raises_loops_or_lies(
    capacity: int, value_size: int, mode: str, seed: int
) -> None:
    rng = random.Random(seed)
    t, buf = make_table(capacity, value_size)
    _fill(t, buf, mode, rng)
    bound = 4 + 2 * TAG_SIZE * t.geometry.window  # find calls one operation may make
    toks = [b"victim"] + [f"g-{i}".encode() for i in range(20)]

    def bounded(fn, *args):  # type: ignore[no-untyped-def]
        before = buf.finds
        result = fn(*args)
        assert buf.finds - before <= bound
        return result

    for tok in toks:
        tag, home = t.tag_of(tok)
        try:
            slot, check, _, _, _ = bounded(t.lookup, tag, home, NOW)
        except KeyError:
            continue
        assert tag_at(t, buf, slot) == tag
        assert independent_check(t, buf, slot)
    assert all(0 <= s < t.geometry.physical_slots for s in t.problems())
    assert sum(t.census(NOW).values()) == t.geometry.physical_slots
    assert isinstance(t.repair_locked(), list)
    assert t.journal()[0] == OP_NONE
    value = b"val" if value_size else None
    for i, tok in enumerate(toks[:8]):
        tag, home = t.tag_of(tok)
        slot, check = bounded(t.store_locked, tag, home, make_meta(FAR + i, i), value, NOW)
        assert home <= slot < home + t.geometry.window
        assert bounded(t.lookup, tag, home, NOW) == (slot, check, FAR + i, value, 0)
        assert t.slot_problem(slot) is None
        if i % 2:
            assert bounded(t.remove_locked, tag, home)
            with pytest.raises(KeyError):
                t.lookup(tag, home, NOW)
    assert t.purge_locked(0, t.geometry.physical_slots, NOW) >= 0
    census = t.census(NOW)
    assert (census["invalid"], census["expired"]) == (0, 0)
    t.clear_locked()
    assert t.problems() == []
    assert t.census(NOW)["empty"] == t.geometry.physical_slots


@settings(max_examples=60, deadline=None)
@given(
    value_size=st.sampled_from([0, 40]),
    writes=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=40),
)
def test_damaged_entries_read_as_original_or_miss(
    value_size: int, writes: list[tuple[int, int]]
) -> None:
    t, buf = make_table(16, value_size)
    g = t.geometry
    entries = {}
    for i in range(14):
        tok = f"e-{i}".encode()
        val = (b"session-%d" % i) * 2 if value_size else None
        store(t, tok, FAR + i, val)
        entries[tok] = (FAR + i, val)
    for pos, byte in writes:
        buf[g.tags_offset + pos % (g.size - g.tags_offset)] = byte
    for tok, (expiry, val) in entries.items():
        got = lookup(t, tok)
        if got is not None:
            assert got[2:] == (expiry, val)
            assert independent_check(t, buf, got[0])
    for slot in range(g.physical_slots):
        if not independent_check(t, buf, slot) and tag_at(t, buf, slot) != bytes(TAG_SIZE):
            assert slot in t.problems()


# -- churn -------------------------------------------------------------------------------------


def test_set_remove_churn_leaves_no_junk() -> None:
    t, buf = make_table(512)
    g = t.geometry
    rng = random.Random(2024)
    pool = [t.tag_of(f"churn-{i}".encode()) for i in range(4000)]
    target = int(0.6 * g.nslots)
    live: list[int] = []
    where: dict[int, int] = {}  # pool index -> position in live
    for op in range(200_000):
        if len(live) < target or (rng.random() < 0.5 and len(live) < target + 20):
            k = rng.randrange(len(pool))
            if k not in where:
                where[k] = len(live)
                live.append(k)
            tag, home = pool[k]
            t.store_locked(tag, home, make_meta(FAR, op), None, NOW)
        else:
            pos = rng.randrange(len(live))
            k = live[pos]
            last = live.pop()
            if last != k:
                live[pos] = last
                where[last] = pos
            del where[k]
            tag, home = pool[k]
            assert t.remove_locked(tag, home)
    census = t.census(NOW)
    assert census == {
        "entries": len(live), "expired": 0, "invalid": 0, "empty": g.physical_slots - len(live)
    }
    assert t.words[W_EVICTIONS] == 0
    assert t.problems() == []
    nonzero = sum(tag_at(t, buf, s) != bytes(TAG_SIZE) for s in range(g.physical_slots))
    assert nonzero == len(live)
    for k in live:
        tag, home = pool[k]
        assert t.lookup(tag, home, NOW)[2] == FAR
    for k in range(len(pool)):
        if k not in where:
            tag, home = pool[k]
            with pytest.raises(KeyError):
                t.lookup(tag, home, NOW)


def test_expiry_churn_reclaims_as_it_goes() -> None:
    t, _ = make_table(512)
    g = t.geometry
    ttl = int(0.6 * g.nslots)  # one insert per ms: about 60% of the home slots live
    now = NOW
    expiry: dict[int, int] = {}
    for i in range(30_000):
        now += 1
        tag, home = t.tag_of(f"exp-{i}".encode())
        t.store_locked(tag, home, make_meta(now + ttl, i), None, now)
        expiry[i] = now + ttl
    assert t.words[W_EVICTIONS] == 0
    live = [i for i, e in expiry.items() if e > now]
    for i in live:
        assert lookup(t, f"exp-{i}".encode(), now) is not None
    t.purge_locked(0, g.physical_slots, now)
    assert t.census(now) == {
        "entries": len(live), "expired": 0, "invalid": 0, "empty": g.physical_slots - len(live)
    }
    assert t.problems() == []


# -- repair and clear --------------------------------------------------------------------------


@pytest.mark.parametrize("value_size", [0, 32])
def test_repair_drops_half_written_slot(value_size: int) -> None:
    t, buf = make_table(16, value_size)
    keep = store(t, b"keep", FAR)
    slot = store(t, b"half", FAR, b"x" if value_size else None)
    t.words[t.check_word_index(slot)] = 0  # killed before the final store of the check
    t.words[W_JOURNAL] = (OP_SLOT << 56) | slot
    assert lookup(t, b"half") is None
    assert slot in t.problems()
    assert t.journal() == (OP_SLOT, slot)
    done = t.repair_locked()
    assert done == [f"dropped half-written slot {slot}"]
    assert tag_at(t, buf, slot) == bytes(TAG_SIZE)
    assert buf[meta_offset(t, slot) : meta_offset(t, slot) + 8] == bytes(8)
    assert t.journal() == (OP_NONE, 0)
    assert t.problems() == []
    assert t.census(NOW)["invalid"] == 0
    assert lookup(t, b"keep") is not None and keep != slot


def test_repair_drops_torn_value_keeps_whole_slot() -> None:
    t, buf = make_table(16, 32)
    slot = store(t, b"torn", FAR, b"old-value")
    v = meta_offset(t, slot) + 8
    buf[v + 4 : v + 7] = b"NEW"  # a new value half-copied, check still the old one
    t.words[W_JOURNAL] = (OP_SLOT << 56) | slot
    assert lookup(t, b"torn") is None
    assert t.repair_locked() == [f"dropped half-written slot {slot}"]
    assert t.problems() == []
    whole = store(t, b"whole", FAR)
    t.words[W_JOURNAL] = (OP_SLOT << 56) | whole
    assert t.repair_locked() == []  # the journaled slot is whole: nothing to undo
    assert lookup(t, b"whole") is not None


def test_repair_finishes_clear_and_ignores_junk_journal() -> None:
    t, _ = make_table(16)
    for i in range(10):
        store(t, f"c-{i}".encode(), FAR)
    t.words[W_JOURNAL] = OP_CLEAR << 56
    assert t.repair_locked() == ["finished an interrupted clear"]
    assert t.census(NOW)["entries"] == 0
    store(t, b"x", FAR)
    t.words[W_JOURNAL] = (7 << 56) | 3
    assert t.repair_locked()[0].startswith("ignored")
    t.words[W_JOURNAL] = (OP_SLOT << 56) | JOURNAL_SLOT_MASK  # slot out of range
    t.repair_locked()
    assert t.journal() == (OP_NONE, 0)
    assert lookup(t, b"x") is not None


@pytest.mark.parametrize("value_size", [0, 16])
def test_clear_zeroes_everything(value_size: int) -> None:
    t, buf = make_table(100, value_size)
    g = t.geometry
    for i in range(90):
        store(t, f"z-{i}".encode(), FAR, b"v" if value_size else None)
    t.words[W_EVICTIONS] = 3
    t.clear_locked()
    tags_end = g.tags_offset + TAG_SIZE * g.physical_slots
    assert buf[g.tags_offset : tags_end] == bytes(tags_end - g.tags_offset)
    for slot in range(g.physical_slots):
        assert t.words[t.check_word_index(slot)] == 0
        assert buf[meta_offset(t, slot) : meta_offset(t, slot) + 8] == bytes(8)
    assert t.census(NOW)["empty"] == g.physical_slots
    assert t.journal() == (OP_NONE, 0)
    assert t.words[W_EVICTIONS] == 3  # counters are not the table's to reset
    assert all(lookup(t, f"z-{i}".encode()) is None for i in range(90))
    assert t.problems() == []
