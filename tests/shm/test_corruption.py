"""Damage the segment file itself (header, slots, size) and check that attach refuses it with
a reason, that get never raises nor returns a wrong session, that writes work or raise a
ShmCacheError, and that check() reports the damage.

The random-damage runs execute in a forked child joined with a generous timeout, so a hang
or a crash (SIGSEGV, SIGBUS) fails the test instead of hanging or killing the run.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from shmcache import (
    IncompatibleSegment,
    LockTimeout,
    SharedMemorySessionCache,
    ShmCacheError,
)
from shmcache.shm.layout import HEADER_SIZE, MUTEX_OFFSET, W_JOURNAL, W_WRITING

TIMEOUT = 60.0
FORK = multiprocessing.get_context("fork")


def shm_path(name: str) -> str:
    return f"/dev/shm/{name}"


def poke(name: str, offset: int, data: bytes) -> None:
    with open(shm_path(name), "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek(name: str, offset: int, n: int) -> bytes:
    with open(shm_path(name), "rb") as f:
        f.seek(offset)
        return f.read(n)


def in_child(fn: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Run ``fn`` in a forked child; return its result, re-raise its failure, and turn a
    hang or a crash into a test failure."""
    parent_end, child_end = FORK.Pipe(duplex=False)

    def body() -> None:
        try:
            child_end.send(("ok", fn()))
        except BaseException:
            child_end.send(("fail", traceback.format_exc()))

    p = FORK.Process(target=body, daemon=True)
    p.start()
    child_end.close()
    if not parent_end.poll(timeout):
        p.kill()
        p.join(TIMEOUT)
        raise AssertionError(f"child hung or crashed (exit code {p.exitcode})")
    status, payload = parent_end.recv()
    p.join(TIMEOUT)
    if status != "ok":
        raise AssertionError("in the child:\n" + payload)
    assert p.exitcode == 0, p.exitcode
    return payload


# -- the header ------------------------------------------------------------------------------

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")

# (what, offset, new bytes as a function of the old ones, pattern the error must match)
HEADER_DAMAGE: list[tuple[str, int, Callable[[bytes], bytes], str]] = [
    ("magic", 0, lambda old: b"NOTSHMCA", "magic"),
    ("magic-zero", 0, lambda old: bytes(8), "not initiali[sz]ed"),
    ("version", 8, lambda old: U32.pack(U32.unpack(old[:4])[0] + 1), "version"),
    ("header-size", 12, lambda old: U32.pack(1234), "header size"),
    ("capacity+1", 16, lambda old: U64.pack(U64.unpack(old)[0] + 1), "geometry|capacity|size"),
    ("capacity-0", 16, lambda old: U64.pack(0), "geometry|capacity"),
    ("capacity-huge", 16, lambda old: U64.pack(1 << 60), "geometry|capacity"),
    ("nslots", 24, lambda old: U64.pack(U64.unpack(old)[0] + 1), "geometry|slots"),
    ("window", 32, lambda old: U32.pack(U32.unpack(old[:4])[0] - 1), "geometry|window"),
    ("value-size", 36, lambda old: U32.pack(U32.unpack(old[:4])[0] + 8), "size"),
    ("value-size-huge", 36, lambda old: U32.pack(0xFFFFFFFF), "value.size|geometry"),
    ("total-size", 40, lambda old: U64.pack(U64.unpack(old)[0] + 8), "size"),
]


@pytest.mark.parametrize(
    "what,offset,damage,pattern", HEADER_DAMAGE, ids=[d[0] for d in HEADER_DAMAGE]
)
def test_damaged_header_is_refused_with_a_reason(
    segment_name: str, what: str, offset: int, damage: Callable[[bytes], bytes], pattern: str
) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=64)
    try:
        cache.set("tok", {"token": "tok"}, 60.0)
        assert SharedMemorySessionCache.attach(segment_name).check() == []  # whole before
        old = peek(segment_name, offset, 8)
        poke(segment_name, offset, damage(old))
        with pytest.raises(IncompatibleSegment, match=pattern) as excinfo:
            SharedMemorySessionCache.attach(segment_name)
        assert isinstance(excinfo.value, ShmCacheError)
        # The process attached before the damage sees it in check().
        problems = cache.check()
        assert problems and any("header" in p for p in problems), problems
        # Restoring the bytes makes the segment acceptable again.
        poke(segment_name, offset, old)
        again = SharedMemorySessionCache.attach(segment_name)
        try:
            assert again.get("tok") == {"token": "tok"}
            assert again.check() == []
        finally:
            again.close()
    finally:
        cache.close()


def test_unreadable_journal_word_is_reported(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=64)
    try:
        cache.set("tok", {"token": "tok"}, 60.0)
        poke(segment_name, W_JOURNAL * 8, U64.pack(0x7F << 56 | 12345))
        problems = cache.check()
        assert any("journal" in p for p in problems), problems
    finally:
        cache.close()


def test_garbage_in_the_lock_bytes_times_out_and_is_reported(segment_name: str) -> None:
    """Lock bytes overwritten to name a thread that does not hold them (only a writer of the
    segment can do that): the kernel is the judge of ownership, not elapsed time, so writes
    raise LockTimeout (bounded, never hang, never "recover" a lock nobody died holding) and
    check() reports the lock. Nothing else is disturbed: reads go on."""
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=100, value_size=64, lock_timeout=0.2
    )
    try:
        cache.set("before", {"token": "before"}, 60.0)
        poke(segment_name, MUTEX_OFFSET, struct.pack("<i", 1))  # "held by thread 1"

        def attempt() -> str:
            try:
                cache.set("tok", {"token": "tok"}, 60.0)
            except LockTimeout as exc:
                return f"LockTimeout: {exc}"
            return "set succeeded"

        outcome = in_child(attempt)
        assert outcome.startswith("LockTimeout"), outcome
        assert cache.get("before") == {"token": "before"}
        assert cache.stats()["lock_recoveries"] == 0
        assert any(p.startswith("lock:") for p in cache.check())
    finally:
        cache.close()


# -- slots -----------------------------------------------------------------------------------


def _fill(cache: SharedMemorySessionCache, n: int, prefix: str = "tok") -> list[str]:
    tokens = [f"{prefix}-{i:04d}-" + "k" * 24 for i in range(n)]
    for t in tokens:
        cache.set(t, {"token": t}, 600.0)
    return tokens


def _locate(cache: SharedMemorySessionCache, token: str) -> dict[str, int]:
    """Byte offsets of one entry's parts, found without assuming the record layout: the tag
    and check by the table's own indexing, the meta and the value by searching the bytes."""
    table = cache._table
    geo = table.geometry
    tag, home = table.tag_of(token.encode())
    slot = table.find(tag, home)
    assert slot >= 0
    snap = table.read_slot(slot)
    assert snap is not None
    meta = snap[1]
    mm = cache._segment.mm
    value = cache._codec.encode({"token": token})  # type: ignore[union-attr]
    records_start = geo.tags_offset + 16 * geo.physical_slots
    value_at = mm.find(value, records_start)
    meta_at = mm.find(meta.to_bytes(8, "little"), records_start)
    assert value_at > 0 and meta_at > 0
    assert mm.find(value, value_at + 1) < 0  # unique
    return {
        "slot": slot,
        "tag": geo.tags_offset + 16 * slot + 5,
        "check": table.check_word_index(slot) * 8 + 3,
        "meta": meta_at + 6,  # a byte of the expiry, not of the nonce
        "length": meta_at + 16,  # the low byte of the value reference's length (after
        # the meta and the fingerprint in the record; the value itself is in the arena)
        "value": value_at + len(value) // 2,
    }


@pytest.mark.parametrize("part", ["tag", "check", "meta", "length", "value"])
def test_damaged_live_slot_is_a_miss_and_reported(segment_name: str, part: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=96)
    reader = SharedMemorySessionCache.attach(segment_name)
    try:
        tokens = _fill(cache, 20)
        victim = tokens[7]
        where = _locate(cache, victim)
        old = peek(segment_name, where[part], 1)
        poke(segment_name, where[part], bytes([old[0] ^ 0x5A]))

        assert reader.get(victim) is None  # damaged: a miss, not an error
        # The process that set it may still trust its own copy (its check word is
        # unchanged) - but it never returns anything else.
        assert cache.get(victim) in (None, {"token": victim})
        for t in tokens:
            if t != victim:
                assert reader.get(t) == {"token": t}
        problems = cache.check()
        assert problems, f"damaged {part} not reported"
        assert any(f"slot {where['slot']}" in p for p in problems), problems

        # Writes go on; the token can be set again and read everywhere.
        cache.set(victim, {"token": victim}, 600.0)
        assert reader.get(victim) == {"token": victim}
        reader.invalidate(victim)
        assert cache.get(victim) is None
        assert reader.get(victim) is None
        # clear() empties every slot, damaged ones included.
        cache.clear()
        assert cache.check() == []
    finally:
        reader.close()
        cache.close()


@pytest.mark.parametrize("op", ["invalidate", "set"])
def test_damaged_tag_leaves_no_stale_local_copy(segment_name: str, op: str) -> None:
    """A process holds a session in its per-process map (trusted while the slot's check word
    is unchanged); the slot's tag is then damaged, and another process logs the token out
    (or sets a newer session). After a logout returns, the first process must not go on
    returning the old session (a ShmCacheError from the call would be acceptable).

    A ``set`` that does not find its tag does not verify the window (that would cost a
    checksum per occupied slot on every new login): there, the damaged slot is dropped by
    ``purge()``, which an admin runs after ``check()`` reports it."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=96)
    other = SharedMemorySessionCache.attach(segment_name)
    try:
        tokens = _fill(cache, 10)
        victim = tokens[3]
        assert cache.get(victim) == {"token": victim}  # a local hit from now on
        where = _locate(cache, victim)
        old = peek(segment_name, where["tag"], 1)
        poke(segment_name, where["tag"], bytes([old[0] ^ 0x5A]))
        newer = {"token": victim, "v": 2}
        try:
            if op == "invalidate":
                other.invalidate(victim)
            else:
                other.set(victim, newer, 600.0)
        except ShmCacheError:
            return  # refusing the write is allowed on a damaged segment
        assert other.get(victim) == (None if op == "invalidate" else newer)
        if op == "set":
            assert any("slot" in problem for problem in other.check())
            assert other.purge() >= 1
            assert other.check() == []
        got = cache.get(victim)
        assert got == (None if op == "invalidate" else newer) or got is None, (
            f"{op} returned, yet the process that cached the session still gets {got!r}"
        )
    finally:
        other.close()
        cache.close()


def test_record_moved_to_another_slot_is_not_another_tokens_session(segment_name: str) -> None:
    """Copy one entry's record (check, meta, value) over another's slot, keeping the victim's
    tag: the check covers the tag, so the victim is a miss, never the other's session."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=96)
    reader = SharedMemorySessionCache.attach(segment_name)
    try:
        tokens = _fill(cache, 10)
        donor, victim = tokens[1], tokens[2]
        d, v = _locate(cache, donor), _locate(cache, victim)
        table = cache._table
        mm = cache._segment.mm
        # The check word, and the record bytes from the meta to the end of the value.
        dv_end = d["length"] + 4 + len(cache._codec.encode({"token": donor}))  # type: ignore[union-attr]
        d_meta = d["meta"] - 6
        v_meta = v["meta"] - 6
        poke(segment_name, v_meta, bytes(mm[d_meta:dv_end]))
        dc = table.check_word_index(d["slot"]) * 8
        poke(segment_name, table.check_word_index(v["slot"]) * 8, bytes(mm[dc : dc + 8]))
        assert reader.get(victim) is None
        assert cache.get(victim) is None  # its check word changed: local copy dropped
        assert reader.get(donor) == {"token": donor}
        assert any(f"slot {v['slot']}" in p for p in cache.check())
    finally:
        reader.close()
        cache.close()


@pytest.mark.parametrize("where", ["outside-window", "duplicate"])
@pytest.mark.parametrize("value_size", [0, 96])
def test_misplaced_or_duplicated_whole_entry_is_reported(
    segment_name: str, where: str, value_size: int
) -> None:
    """A whole, checksum-valid copy of an entry where it cannot be (out of its probe window,
    or a second copy in it): check() names it; lookups still find the right one."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=1000, value_size=value_size)
    try:
        tokens = _fill(cache, 30)
        table = cache._table
        geo = table.geometry
        t = tokens[0]
        tag, home = table.tag_of(t.encode())
        slot = table.find(tag, home)
        snap = table.read_slot(slot)
        assert snap is not None
        meta, value = snap[1], snap[3]
        if where == "outside-window":
            target = (home + geo.window + 100) % geo.nslots
            window = range(home, home + geo.window)
            while table.check_of(target) or target in window:
                target = (target + 1) % geo.nslots
        else:
            target = table.find(bytes(16), home)
            assert target > slot
        cache._lock.acquire()
        try:
            table._write_slot_locked(target, tag, meta, value)  # the table's own writer
            table.words[W_WRITING] = 0  # a complete write, as the cache ends one
        finally:
            cache._lock.release()
        problems = cache.check()
        expected = "outside its probe window" if where == "outside-window" else "same tag"
        assert any(f"slot {target}" in p and expected in p for p in problems), problems
        fresh = SharedMemorySessionCache.attach(segment_name)
        try:
            assert fresh.get(t) == ({"token": t} if value_size else None)
            if where == "outside-window":  # (duplicates: test_invalidate_leaves_no_dup...)
                fresh.invalidate(t)
                assert cache.get(t) is None
                assert fresh.get(t) is None
        finally:
            fresh.close()
    finally:
        cache.close()


def test_invalidate_leaves_no_duplicate_readable(segment_name: str) -> None:
    """A second whole copy of an entry in its window (damage: normal writes never make
    one). invalidate() returns normally, so no copy may stay readable anywhere."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=1000, value_size=96)
    try:
        tokens = _fill(cache, 10)
        table = cache._table
        t = tokens[0]
        tag, home = table.tag_of(t.encode())
        snap = table.read_slot(table.find(tag, home))
        assert snap is not None
        cache._lock.acquire()
        try:
            table._write_slot_locked(table.find(bytes(16), home), tag, snap[1], snap[3])
        finally:
            cache._lock.release()
        fresh = SharedMemorySessionCache.attach(segment_name)
        try:
            fresh.invalidate(t)
            assert fresh.get(t) is None, "a logged-out session is still readable"
        finally:
            fresh.close()
    finally:
        cache.close()


def _fuzz(name: str, value_mode: bool, seed: int, rounds: int) -> dict[str, int]:
    """Random bytes over the slot arrays, many times; get never raises nor lies; writes work
    or raise ShmCacheError; check() always answers with a list of strings."""
    cache = SharedMemorySessionCache.create(
        name, capacity=128, value_size=96 if value_mode else 0, lock_timeout=0.5
    )
    reader = SharedMemorySessionCache.attach(name, lock_timeout=0.5)
    rng = random.Random(seed)
    tokens = _fill(cache, 120, prefix=f"fz{seed}")
    geo = cache._table.geometry
    counts = {"errors": 0, "sets": 0, "hits": 0, "reported": 0}
    with open(shm_path(name), "r+b", buffering=0) as f:
        for _ in range(rounds):
            for _ in range(rng.randint(1, 4)):
                off = rng.randrange(geo.tags_offset, geo.size - 1)
                n = min(rng.choice([1, 2, 8, 16, 48]), geo.size - off)
                f.seek(off)
                f.write(rng.randbytes(n) if rng.random() < 0.8 else bytes(n))
            for c in (cache, reader):
                for t in rng.sample(tokens, 15):
                    got = c.get(t)
                    if got is not None:
                        counts["hits"] += 1
                        assert got == {"token": t}, (t, got)
            assert reader.get("") is None
            t = rng.choice(tokens)
            op = rng.random()
            try:
                if op < 0.45:
                    writer = rng.choice((cache, reader))
                    writer.set(t, {"token": t}, rng.choice([0.001, 600.0]))
                    counts["sets"] += 1
                elif op < 0.75:
                    # (Whether a local copy outlives this on a damaged slot is checked in
                    # test_damaged_tag_leaves_no_stale_local_copy.)
                    rng.choice((cache, reader)).invalidate(t)
                elif op < 0.77:
                    cache.clear()
                    assert cache.check() == []
                elif op < 0.85:
                    reader.purge()
                else:
                    # A fresh login: no miss of t before it in this thread (a miss above
                    # took a lease, and damage to its stamp would drop the set, rightly:
                    # a damaged stamp reads as a logout, which costs a miss, nothing more).
                    cache._leases.forget(t)
                    cache.set(t, {"token": t}, 600.0)
                    counts["sets"] += 1
                    assert cache.get(t) == {"token": t}
                    if value_mode:
                        assert reader.get(t) == {"token": t}
            except ShmCacheError:
                counts["errors"] += 1
            problems = cache.check()
            assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
            counts["reported"] += bool(problems)
            stats = reader.stats()
            assert stats["entries"] >= 0
    cache.clear()
    assert cache.check() == []
    for t in tokens[:10]:
        cache._leases.forget(t)  # fresh logins (a miss before the clear would void them)
        cache.set(t, {"token": t}, 600.0)
        assert reader.get(t) == ({"token": t} if value_mode else None)
    reader.close()
    cache.close()
    return counts


@pytest.mark.parametrize("value_mode", [True, False], ids=["value", "hash"])
def test_random_slot_damage_never_crashes_hangs_or_lies(
    segment_name: str, value_mode: bool
) -> None:
    counts = in_child(lambda: _fuzz(segment_name, value_mode, seed=7, rounds=400))
    assert counts["reported"] > 0  # the damage was seen by check()
    assert counts["sets"] > 0
    if value_mode:
        assert counts["hits"] > 0  # reads were exercised, not all misses


# -- size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("new_size", [0, 100, HEADER_SIZE, -1, -4096, +4096])
def test_truncated_or_grown_segment_is_refused(segment_name: str, new_size: int) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=100, value_size=64)
    size = cache.stats()["size_bytes"]
    cache.close()  # a mapping of a truncated file would SIGBUS the process touching it
    target = size + new_size if new_size < 0 or new_size == 4096 else new_size
    os.truncate(shm_path(segment_name), target)
    with pytest.raises(IncompatibleSegment, match=r"size|small|bytes"):
        SharedMemorySessionCache.attach(segment_name)
