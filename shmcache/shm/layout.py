"""The binary format of a shmcache segment: the only module that knows where bytes go.

A segment is one header page followed by the slot arrays: the tags, contiguous so that
one ``find`` call in C scans a whole probe window; the check words, dense, because a cached
``get`` reads only that word; the user tags; the records (expiry, fingerprint and, in value
mode, a reference to the value); the lease stamps; and in value mode the value arena::

    offset 0      +------------------------------------------------------------+
                  | header (HEADER_SIZE = 4096 bytes)                          |
                  |   0  magic  b"SHMCACHE"          8  layout version (u32)   |
                  |  12  header size (u32)          16  capacity (u64)         |
                  |  24  home slots N (u64)         32  probe window W (u32)   |
                  |  36  value size (u32)           40  total size (u64)       |
                  |  48  tag seed (u64, secret)     56  check seed (u64)       |
                  |  64  creator pid (u64)          72  creator uid (u64)      |
                  |  80  created, unix time (f64)   88  pid namespace inode    |
                  |  96  time namespace inode       104 lock ABI (u32)         |
                  | 128.. mutable words, one aligned 8-byte store each:        |
                  |  128 writing     136 lock generation  144 journal          |
                  |  152 evictions   160 lock recoveries  168 oversize values  |
                  |  176 clears      184 retired hits     192 retired misses   |
                  |  200 keeper (the process that unlinks the name at exit)    |
                  |  208 generation of the last clear  216 lease drops         |
                  | 256.. the lock: a robust pthread mutex (64 bytes reserved) |
                  | 512.. 112 per-process records: owner, hits, misses, id     |
    TAGS = 4096   +------------------------------------------------------------+
                  | P = N + W - 1 tags of 16 bytes: keyed xxh3-128 of the      |
                  | token; all zero = empty slot                               |
    CHECKS        | P check words (u64): bits 0-39 keyed xxh3-64 of tag|meta|  |
                  | user|fingerprint[|reference|value] (never 0), bits 40-63   |
                  | generation bits 20-43; 0 = no valid entry                  |
    USERS         | P user words (u64): keyed xxh3-64 of str(user id), never 0;|
                  | 0 = a session with no user. Dense, so that revoking a user |
                  | is one C-level find over the array                         |
    RECORDS       | P records of RECORD_STRIDE bytes:                          |
                  |   +0  meta u64: expiry in ms << 20 | generation bits 0-19  |
                  |   +8  fingerprint u64: keyed hash of the session's         |
                  |       encoding (0: unknown), so that a process holding an  |
                  |       equal session keeps it across another's equal set    |
                  |   +16 value reference (only if value size > 0): u64        |
                  |       (unit + 1) << 32 | length; 0 = no value             |
    LEASES        | B words (u64), B = a power of two >= capacity: the lock    |
                  | generation of the last logout of a token or user hashed to |
                  | the bucket, so a set racing a logout can tell (leases)     |
    ARENA_CTL     | value mode only: 8 control words of the allocator, then    |
                  | one free-list head per block size in units (arena.py)      |
    ARENA         | value mode only, page-aligned: blocks of 16-byte units,    |
                  | (P + 1) x value size (at most 64 GiB), reserved with       |
                  | posix_fallocate as values fill it: only what is used costs |
                  +------------------------------------------------------------+

In hash-only mode a slot is 48 bytes (tag 16, check 8, user 8, meta 8, fingerprint 8); at
the 1/2 maximum load, plus the lease stamps, that is 104 bytes of shared memory per session
of capacity; value mode adds the 8-byte reference (120 bytes), and each stored value its
encoding rounded up to 16 bytes, in the arena.

Byte order is little-endian throughout. The immutable header is packed with ``struct``;
the mutable words and the check/meta arrays are read and written through a native ``'Q'``
memoryview, because CPython copies an aligned item of such a view with one 8-byte load or
store (``struct`` writes byte by byte): a concurrent reader never sees half of a word. That
is why shmcache refuses big-endian hosts instead of byte-swapping.

A key with home slot ``h`` lives somewhere in ``[h, h + W)``. The ``W - 1`` slots after the
last home slot are overflow, so a window never wraps: it is one contiguous byte range.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from typing import Any

from .._errors import IncompatibleSegment, InvalidArgument

MAGIC = b"SHMCACHE"
LAYOUT_VERSION = 5  # 2: USERS (invalidate_by_user); 3: the robust mutex; 4: fingerprints,
# leases; 5: values in a variable-size arena (see arena.py)
HEADER_SIZE = 4096

# Sizing: at most 1/2 of the home slots are live at capacity, and a key may sit at most
# W - 1 slots past its home. Measured (`python -m bench.sizing`, the table's own code):
# under sustained churn at capacity (remove a random live session, insert a new one), 7.2
# million inserts evicted nothing and no session sat more than 42-55 slots from home, in a
# window of 96; at a 2/3 load the same churn reached 95 and evicted (16 in 3.9 million),
# so 2/3, and its third less memory, was given up. See README "Capacity and evictions".
MAX_LOAD_NUM, MAX_LOAD_DEN = 1, 2
MAX_WINDOW = 96
MAX_CAPACITY = 1 << 31
MAX_VALUE_SIZE = 1 << 20

TAG_SIZE = 16
EXPIRY_BITS = 44
NONCE_BITS = 20
NONCE_MASK = (1 << NONCE_BITS) - 1
MAX_EXPIRY_MS = (1 << EXPIRY_BITS) - 1
# A check word: bits 40-63 hold bits 20-43 of the lock generation (the meta holds bits
# 0-19), bits 0-39 a keyed hash of tag|meta|value. Identical writes to one slot (same token,
# same absolute expiry: a common pattern) thus get different check words for 2**44 writes.
CHECK_HASH_BITS = 40
CHECK_HASH_MASK = (1 << CHECK_HASH_BITS) - 1
STAMP_MASK = (1 << (64 - CHECK_HASH_BITS)) - 1
UNIT = 16  # the arena's allocation unit (see arena.py)
MAX_ARENA = (UNIT << 32) - 4096  # a reference names unit + 1 with 32 bits
ARENA_CTL_WORDS = 8
U64 = (1 << 64) - 1

ZERO_TAG = bytes(TAG_SIZE)

# Immutable header, packed once at creation.
HEADER = struct.Struct("<8sIIQQIIQQQQQdQQI4x")
assert HEADER.size == 112

# Mutable header words, as indexes into the segment viewed as u64 words.
W_WRITING = 128 // 8  # 1 while a holder writes: set at acquire, cleared when it is done
W_GEN = 136 // 8
W_JOURNAL = 144 // 8
W_EVICTIONS = 152 // 8
W_RECOVERIES = 160 // 8
W_OVERSIZE = 168 // 8
W_CLEARS = 176 // 8
W_RETIRED_HITS = 184 // 8
W_RETIRED_MISSES = 192 // 8
W_KEEPER = 200 // 8  # owner word of the process that removes the name at exit (0: nobody)
W_CLEARED_AT = 208 // 8  # lock generation of the last clear (leases: see cache.py)
W_LEASE_DROPS = 216 // 8  # sets not cached because a logout raced them (see cache.py)
MUTEX_OFFSET = 256  # the segment lock (see mutex.py); 64 bytes, 64-byte aligned

# Per-process hit/miss records (see _counters): (owner word, hits, misses, object id).
COUNTER_RECORDS_W = 512 // 8
COUNTER_RECORDS = (HEADER_SIZE - 512) // 32

# Journal: what the lock holder is modifying, so a recovery knows what to verify.
OP_NONE, OP_SLOT, OP_CLEAR = 0, 1, 2
JOURNAL_SLOT_MASK = (1 << 56) - 1


def host_supported() -> bool:
    """Native ``'Q'`` views are the documented little-endian words only on such hosts."""
    return sys.byteorder == "little"


def ref_units(length: int) -> int:
    """Units of the arena block holding a value of ``length`` bytes (at least one)."""
    return max(1, -(-length // UNIT))


def _round_page(n: int) -> int:
    return -(-n // 4096) * 4096


@dataclass(frozen=True)
class Geometry:
    """Where everything is, computed from (capacity, value size) alone."""

    capacity: int
    nslots: int
    window: int
    value_size: int

    @classmethod
    def for_capacity(cls, capacity: int, value_size: int = 0) -> Geometry:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise InvalidArgument(f"capacity must be an int, got {capacity!r}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise InvalidArgument(f"capacity must be between 1 and {MAX_CAPACITY}, got {capacity}")
        if isinstance(value_size, bool) or not isinstance(value_size, int):
            raise InvalidArgument(f"value_size must be an int, got {value_size!r}")
        if not 0 <= value_size <= MAX_VALUE_SIZE:
            raise InvalidArgument(
                f"value_size must be between 0 and {MAX_VALUE_SIZE}, got {value_size}"
            )
        nslots = max(2, math.ceil(capacity * MAX_LOAD_DEN / MAX_LOAD_NUM))
        return cls(capacity, nslots, min(MAX_WINDOW, nslots), value_size)

    @property
    def physical_slots(self) -> int:
        return self.nslots + self.window - 1

    @property
    def record_stride(self) -> int:
        return 24 if self.value_size else 16  # meta, fingerprint[, value reference]

    @property
    def max_units(self) -> int:
        """Units of the largest block: a value of ``value_size`` bytes."""
        return ref_units(self.value_size) if self.value_size else 0

    @property
    def lease_buckets(self) -> int:
        return max(1024, 1 << (self.capacity - 1).bit_length())

    @property
    def tags_offset(self) -> int:
        return HEADER_SIZE

    @property
    def checks_offset(self) -> int:
        return self.tags_offset + TAG_SIZE * self.physical_slots

    @property
    def users_offset(self) -> int:
        return self.checks_offset + 8 * self.physical_slots

    @property
    def records_offset(self) -> int:
        return self.users_offset + 8 * self.physical_slots

    @property
    def leases_offset(self) -> int:
        return self.records_offset + self.record_stride * self.physical_slots

    @property
    def arena_ctl_offset(self) -> int:
        return self.leases_offset + 8 * self.lease_buckets

    @property
    def arena_offset(self) -> int:
        """Where values start (page-aligned, so that the arena is committed by pages)."""
        if not self.value_size:
            return self.arena_ctl_offset
        return _round_page(self.arena_ctl_offset + 8 * (ARENA_CTL_WORDS + self.max_units + 1))

    @property
    def arena_bytes(self) -> int:
        """Room for a value of ``value_size`` bytes in every slot, plus the one a set
        writes before it frees the one it replaces (at most 64 GiB). Virtual: pages are
        reserved as values need them (arena.py), so only what is used costs memory."""
        if not self.value_size:
            return 0
        return min(MAX_ARENA, (self.physical_slots + 1) * self.max_units * UNIT)

    @property
    def reserved_at_creation(self) -> int:
        """Bytes reserved when the segment is made: everything but the arena."""
        return self.arena_offset

    @property
    def size(self) -> int:
        return self.arena_offset + self.arena_bytes

    def pack_header(self, info: HeaderInfo) -> bytes:
        return HEADER.pack(
            MAGIC, LAYOUT_VERSION, HEADER_SIZE, self.capacity, self.nslots, self.window,
            self.value_size, self.size, info.tag_seed, info.check_seed, info.creator_pid,
            info.creator_uid, info.created, info.pidns, info.timens, info.lock_abi,
        )


@dataclass(frozen=True)
class HeaderInfo:
    """The immutable header fields of a segment, validated."""

    geometry: Geometry
    tag_seed: int
    check_seed: int
    creator_pid: int
    creator_uid: int
    created: float
    pidns: int
    timens: int  # monotonic clocks (expiry times) differ between time namespaces
    lock_abi: int  # which C library's mutex is at MUTEX_OFFSET (see mutex.py)


def read_header(buf: Any, actual_size: int) -> HeaderInfo:
    """Parse and validate the header; raise ``IncompatibleSegment`` saying what is wrong.

    Every number that later bounds an offset is checked here, once, against the size the
    kernel reports for the segment: nothing read from shared memory afterwards can move a
    probe outside the mapping.
    """
    if actual_size < HEADER_SIZE:
        raise IncompatibleSegment(
            f"segment is {actual_size} bytes, smaller than a shmcache header ({HEADER_SIZE})"
        )
    (magic, version, header_size, capacity, nslots, window, value_size, size, tag_seed,
     check_seed, pid, uid, created, pidns, timens, lock_abi) = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        if magic == bytes(8):
            raise IncompatibleSegment(
                "segment header is not initialised (its creator is still writing it, "
                "or died doing so)"
            )
        raise IncompatibleSegment(f"not a shmcache segment (magic {magic!r})")
    if version != LAYOUT_VERSION:
        raise IncompatibleSegment(
            f"segment has layout version {version}; this shmcache reads version "
            f"{LAYOUT_VERSION} only (recreate the segment)"
        )
    if header_size != HEADER_SIZE:
        raise IncompatibleSegment(f"header size {header_size}, expected {HEADER_SIZE}")
    try:
        geo = Geometry.for_capacity(capacity, value_size)
    except InvalidArgument as exc:
        raise IncompatibleSegment(f"bad geometry in header: {exc}") from None
    if (geo.nslots, geo.window) != (nslots, window):
        raise IncompatibleSegment(
            f"header geometry (slots {nslots}, window {window}) does not match capacity "
            f"{capacity} (expected slots {geo.nslots}, window {geo.window})"
        )
    if size != geo.size or actual_size != geo.size:
        raise IncompatibleSegment(
            f"segment size mismatch: header says {size}, layout needs {geo.size}, "
            f"segment is {actual_size} bytes"
        )
    return HeaderInfo(geo, tag_seed, check_seed, pid, uid, created, pidns, timens, lock_abi)
