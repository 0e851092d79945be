"""``SharedMemorySessionCache``: the seed's ``SessionCache`` on a shared-memory table.

Read path (``get``), the hot path of every authenticated request, takes no lock and does no
hashing when the token is known to this process: each process keeps a map
``token -> (session, slot's check word, check, expiry)`` of the sessions it set or decoded,
and trusts an entry only while the slot's check word in shared memory still holds the value
it had then. Any later write to that slot by any process (a set of the same token, an
invalidate, a clear, an eviction, a reclaim) changes the word, so the entry is dropped: no
process returns a session older than the latest set, and a logout is seen everywhere as
soon as ``invalidate`` returns. The check word is one aligned 8-byte load.

Writes take the segment lock (``_lock``), which survives the death of its holder.
"""

from __future__ import annotations

import os
import secrets
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._args import MAX_TTL, positive_number, token_bytes, user_key
from .._args import ttl as ttl_arg
from .._closing import ClosesOnExit
from .._errors import (
    CacheClosed,
    InvalidArgument,
    InvalidType,
    ShmCacheError,
)
from .._leases import DEFAULT_TIMEOUT as DEFAULT_LEASE_TIMEOUT
from .._leases import EXPIRED, NO_LEASE, Leases
from .._protocol import UserIdOf
from ..codecs import Codec, PickleCodec
from . import construct
from . import fast as _fast
from . import proc as _proc
from . import segment as _segment
from .admin import SegmentAdmin
from .counters import ProcessCounters
from .layout import (
    MAX_EXPIRY_MS,
    NONCE_BITS,
    NONCE_MASK,
    U64,
    W_CLEARED_AT,
    W_CLEARS,
    W_GEN,
    W_LEASE_DROPS,
    W_OVERSIZE,
    W_WRITING,
    HeaderInfo,
)
from .local import LocalCopies, _Local
from .lock import SegmentLock
from .table import Table

Clock = Callable[[], float]
_PURGE_CHUNK = 4096  # slots reclaimed per lock hold, so purge never stalls writers long

_instances: weakref.WeakSet[SharedMemorySessionCache] = weakref.WeakSet()


def _reset_counters_after_fork() -> None:
    # The child is another process: its figures start at zero in a record of its own.
    for cache in list(_instances):
        cache._hits = cache._misses = 0
        cache._counter_rec = -2
        if cache._fast is not None:
            cache._fast.reset_counts()


os.register_at_fork(after_in_child=_reset_counters_after_fork)


class SharedMemorySessionCache(LocalCopies, SegmentAdmin, ClosesOnExit):
    """A ``SessionCache`` whose entries every process on the host shares.

    Make one with :meth:`create` (once, in the process that owns the segment, e.g. the
    gunicorn master before it forks) or :meth:`attach` (by name, anywhere else).

    Two modes, chosen at creation:

    * ``value_size == 0`` (default): shared memory holds only keyed token hashes and expiry
      times. Each process keeps the session objects it set; ``get`` returns one only while
      the shared table says the token is still valid and unchanged since. A token set in
      another process is a miss here (the caller validates it and calls ``set``).
    * ``value_size > 0``: the encoded session (``codec``, pickle by default) is stored too,
      so a session set in one process is a hit in all. A session whose encoding is longer
      than ``value_size`` is stored without its value: it stays a hit in the process that
      set it, is a miss elsewhere, and is counted in ``stats()["oversize"]``.

    ``stats()`` reports segment-wide figures, except ``hits`` and ``misses``, which are this
    process's own (sharing them would put a shared write on every ``get``).
    """

    def __init__(
        self,
        segment: _segment.Segment,
        info: HeaderInfo,
        *,
        codec: Codec | None,
        clock: Clock | None,
        lock_timeout: float,
        attach_options: dict[str, Any],
        user_id_of: UserIdOf | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        geo = info.geometry
        self._segment = segment
        self._info = info
        self._table = Table(segment.mm, geo, info.tag_seed, info.check_seed, segment.reserve)
        self._words = self._table.words
        self._checks_w = self._table.check_word_index(0)  # slot i's check word: + i
        self._lock = SegmentLock(
            segment.mm, self._words, self._table.repair_locked, timeout=lock_timeout
        )
        self._value_mode = geo.value_size > 0
        self._codec: Codec | None = codec if codec is not None else (
            PickleCodec() if self._value_mode else None
        )
        self._clock: Clock = clock if clock is not None else time.monotonic
        self._user_id_of = user_id_of
        self._local: dict[str, _Local] = {}
        self._leases = Leases(lease_timeout, self._clock)
        self._lease_drops = 0  # this object's sets not stored (see set())
        self._oversize_len = 0
        self._max_local = max(1024, geo.physical_slots)
        self._hits = 0
        self._misses = 0
        self._decode_errors = 0
        self._counters = ProcessCounters(self._words, _proc.is_alive)
        self._counter_rec = -2  # not claimed yet (-1: no record free, figures stay local)
        self._object_id = secrets.randbits(63) | 1
        self._closed = False
        self._pickle_options = {
            "codec": codec, "lock_timeout": lock_timeout, "user_id_of": user_id_of,
            "lease_timeout": lease_timeout, **attach_options,
        }
        # The compiled core (fast.py), unless it is not built or SHMCACHE_PURE_PYTHON is
        # set: its methods then answer get/set/invalidate/invalidate_by_user of this
        # object (instance attributes: the class's methods below stay the reference).
        self._fast: Any = _fast.make_core(self)
        if self._fast is not None:
            core = self._fast
            self.__dict__.update(
                get=core.get, set=core.set, invalidate=core.invalidate,
                invalidate_by_user=core.invalidate_by_user,
            )
        _instances.add(self)

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        capacity: int = 65536,
        value_size: int = 0,
        codec: Codec | None = None,
        clock: Clock | None = None,
        *,
        mode: int = 0o600,
        lock_timeout: float = 1.0,
        user_id_of: UserIdOf | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> SharedMemorySessionCache:
        """Create a new segment named ``name``, owner-only by default.

        Raises ``SegmentExists`` (a ``FileExistsError``) if the name is taken, and
        ``NoSpace`` if /dev/shm cannot hold the segment (reserved now, not on first touch).
        """
        positive_number("lock_timeout", lock_timeout)
        segment, info = construct.create_segment(name, capacity, value_size, codec, mode)
        return cls(
            segment, info, codec=codec, clock=clock, lock_timeout=lock_timeout,
            attach_options={"allow_writable_by_others": bool(mode & 0o022)},
            user_id_of=user_id_of, lease_timeout=positive_number("lease_timeout", lease_timeout),
        )

    @classmethod
    def attach(
        cls,
        name: str,
        codec: Codec | None = None,
        clock: Clock | None = None,
        *,
        lock_timeout: float = 1.0,
        owner_uid: int | None = None,
        allow_writable_by_others: bool = False,
        user_id_of: UserIdOf | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> SharedMemorySessionCache:
        """Open the existing segment ``name``.

        Refuses (``ShmCacheError``, saying why) a segment with the wrong magic, layout
        version or size, one made in another pid namespace, and one owned by another user
        (``owner_uid`` names the owner to trust instead) or writable by group/others
        (``allow_writable_by_others=True`` accepts it). Root is no exception: a segment
        squatted in world-writable /dev/shm is exactly the attack.
        """
        positive_number("lock_timeout", lock_timeout)
        segment, info = construct.attach_segment(name, codec, owner_uid, allow_writable_by_others)
        return cls(
            segment, info, codec=codec, clock=clock, lock_timeout=lock_timeout,
            attach_options={
                "owner_uid": owner_uid, "allow_writable_by_others": allow_writable_by_others
            },
            user_id_of=user_id_of, lease_timeout=positive_number("lease_timeout", lease_timeout),
        )

    # -- the SessionCache protocol -------------------------------------------------------

    def get(self, token: str) -> Any | None:
        """The session cached for ``token``, or None. Never raises because of the segment."""
        entry = self._local.get(token)
        if entry is not None:
            session, word, check, expires, _ = entry
            if self._words[word] == check and self._clock() < expires:
                self._hits += 1
                return session
        return self._get_slow(token, entry)

    def _get_slow(self, token: str, entry: _Local | None) -> Any | None:
        if not isinstance(token, str):
            raise InvalidType(f"token must be a str, got {type(token).__name__}")
        if self._closed:
            raise CacheClosed("this SharedMemorySessionCache is closed")
        session = None
        tag = b""
        if token:
            table = self._table
            tag, home = table.tag_of(token_bytes(token))
            try:
                session = self._load(token, tag, home, entry)
            except Exception:  # a damaged or racing slot, or a codec error: a miss
                session = None
        if session is not None:
            self._hits += 1
            self._publish()
            return session
        if entry is not None:
            self._local.pop(token, None)
        if token:
            # A lease: the first lock generation that may not be finished now. A logout (of
            # this token, of its user, or a clear) marks its bucket with its generation;
            # the set compares (see set() and shmcache/_leases.py). Read the generation
            # first: acquire() raises W_WRITING before it raises the generation.
            words = self._words
            gen = words[W_GEN]
            self._leases.grant(token, gen if words[W_WRITING] else gen + 1)
        self._misses += 1
        self._publish()
        return None

    def _load(self, token: str, tag: bytes, home: int, entry: _Local | None) -> Any | None:
        """The live entry of ``tag``: this process's own copy if the slot holds an equal
        session (same fingerprint: another process set it again), else, in value mode,
        the decoded value."""
        try:
            slot, check, expiry_ms, value, fp = self._table.lookup(tag, home, self._now_ms())
        except KeyError:
            return None
        if entry is not None and fp and entry[4] == fp:
            session = entry[0]  # an equal set elsewhere: keep ours, no validation, no decode
        elif value is None:
            return None
        else:
            assert self._codec is not None
            try:
                session = self._codec.decode(value)
            except Exception:
                self._decode_errors += 1
                return None
        self._remember(token, session, slot, check, expiry_ms, fp)
        return session

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        """Cache ``session`` for ``token`` for ``ttl_seconds`` (millisecond resolution).

        ``user_id`` (or, if not given, the ``user_id_of(session)`` passed at create/attach)
        names the session's user for ``invalidate_by_user``; only its keyed hash is stored.
        Never fails for lack of room: a full probe window reclaims expired entries, then
        evicts the one that expires soonest. Rejected arguments change nothing.

        If this thread's last ``get`` of ``token`` missed and a logout of it (or of its user,
        or a ``clear``) happened since, the session is not stored: see ``_leases.py``.
        """
        if type(token) is not str and not isinstance(token, str):
            raise InvalidType(f"token must be a str, got {type(token).__name__}")
        if not token:
            raise InvalidArgument("token must not be empty")
        ttl = ttl_seconds
        if (type(ttl) is not float and type(ttl) is not int) or not 0 < ttl <= MAX_TTL:
            ttl = ttl_arg(ttl_seconds)  # the general (and the error) path
        if user_id is None and self._user_id_of is not None:
            user_id = self._user_id_of(session)
        table = self._table
        user = 0 if user_id is None else table.user_tag(user_key(user_id))
        value, fp, oversize = self._encode(session)
        if self._closed:
            raise CacheClosed("this SharedMemorySessionCache is closed")
        lease = self._leases.take(token)
        tag, home = table.tag_of(token_bytes(token))
        now = self._clock()
        end = (now + ttl) * 1000
        # Out of range (a clock far in the future, or NaN): clamp, never raise.
        expiry_ms = round(end) if 0 <= end <= MAX_EXPIRY_MS else (MAX_EXPIRY_MS if end > 0 else 0)
        words = self._words
        lock = self._lock
        lock.refuse_reentry()
        try:  # the pattern of lock.py: acquire inside, release first in the finally
            gen = lock.acquire()
            if lease is EXPIRED or (lease is not NO_LEASE and self._logged_out_since(
                lease, gen, table.lease_word(tag), user
            )):
                # A logout that was not finished when this thread missed: the validation
                # raced it, its session is not stored. (A bucket shared with another
                # token's logout makes a false drop: it costs one more miss.)
                # (An expired lease: not stored either, see _leases.py.)
                self._bump(W_LEASE_DROPS)
                table.remove_locked(tag, home)  # nor an older copy: the token stays a miss
                slot = -1
            else:
                slot, check = table.store_locked(
                    tag,
                    home,
                    (expiry_ms << NONCE_BITS) | (gen & NONCE_MASK),
                    value,
                    int(now * 1000),
                    gen >> NONCE_BITS,
                    user,
                    fp,
                )
                if oversize:
                    self._bump(W_OVERSIZE)
            words[W_WRITING] = 0  # done: nothing for the next holder to repair
        except BaseException:
            self._repair_if_held()  # e.g. a signal handler raised mid-write
            raise
        finally:
            lock.release()
        if slot < 0:
            self._local.pop(token, None)
            self._lease_drops += 1
            return
        if oversize:
            self._warn_oversize(len(value or b"") if value else -1)
        self._remember(token, session, slot, check, expiry_ms, fp)

    def _logged_out_since(self, lease: int, gen: int, token_word: int, user: int) -> bool:
        """Whether a logout of the token's bucket, of the user's, or a clear, was not finished
        when the lease was granted. Caller holds the lock (``gen`` is its generation)."""
        mark = self._table.logout_mark_locked
        return (
            mark(token_word, gen) >= lease
            or mark(W_CLEARED_AT, gen) >= lease
            or bool(user and mark(self._table.user_lease_word(user), gen) >= lease)
        )

    def invalidate(self, token: str) -> None:
        """Drop ``token`` everywhere: once this returns, ``get`` misses in every process.

        Raises (``LockTimeout``...) rather than return without having removed it.
        """
        if not isinstance(token, str):
            raise InvalidType(f"token must be a str, got {type(token).__name__}")
        self._local.pop(token, None)
        self._ensure_open()
        if not token:
            return
        table = self._table
        tag, home = table.tag_of(token_bytes(token))
        lock = self._lock
        lock.refuse_reentry()
        try:
            words = self._words
            words[table.lease_word(tag)] = lock.acquire()  # voids racing validations' leases
            found = table.remove_locked(tag, home)
            self._words[W_WRITING] = 0
        except BaseException:
            self._repair_if_held()  # e.g. a signal handler raised mid-write
            raise
        finally:
            lock.release()
        if not found:
            self._drop_damaged_copies(tag, home)
        self._publish()

    def _drop_damaged_copies(self, tag: bytes, home: int) -> None:
        """A logout that did not find its tag: maybe expired and reclaimed, or maybe the tag
        was damaged in place while a process still trusts the slot's check word: drop such
        damaged copies too (found outside the lock, re-checked under it). The compiled
        core calls this too, when its scan finds a candidate."""
        table, lock = self._table, self._lock
        suspects = table.damaged_copies(tag, home)
        if suspects:
            lock.refuse_reentry()
            try:
                lock.acquire()
                table.drop_damaged_locked(suspects)
                self._words[W_WRITING] = 0
            except BaseException:
                self._repair_if_held()  # e.g. a signal handler raised mid-write
                raise
            finally:
                lock.release()

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Drop every session of ``user_id`` (compared by ``str()``) in every process.

        Once this returns, ``get`` of any of that user's tokens misses everywhere; a ``set``
        that completes later is a later login and stays. Returns how many live sessions it
        dropped (exact: the scan and the removals happen under the lock). Costs one
        C-level scan of the user array (about 1 us per 8 KiB of table) plus each removal.
        """
        user = self._table.user_tag(user_key(user_id))
        self._ensure_open()
        now_ms = self._now_ms()
        lock = self._lock
        lock.refuse_reentry()
        try:
            self._words[self._table.user_lease_word(user)] = lock.acquire()  # voids leases
            dropped = self._table.remove_user_locked(user, now_ms)
            self._words[W_WRITING] = 0
        except BaseException:
            self._repair_if_held()  # e.g. a signal handler raised mid-write
            raise
        finally:
            lock.release()
        return dropped

    def clear(self) -> None:
        """Drop every session in every process (every user logs in again)."""
        self._ensure_open()
        self._local.clear()
        lock = self._lock
        lock.refuse_reentry()
        try:
            self._words[W_CLEARED_AT] = lock.acquire()  # voids every lease taken before
            self._table.clear_locked()
            self._bump(W_CLEARS)
            self._words[W_WRITING] = 0
        except BaseException:
            self._repair_if_held()  # e.g. a signal handler raised mid-write
            raise
        finally:
            lock.release()
        self._publish()

    # -- lifetime ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def capacity(self) -> int:
        return self._info.geometry.capacity

    @property
    def value_size(self) -> int:
        return self._info.geometry.value_size

    def close(self) -> None:
        """Detach this process (the segment and its sessions stay for the others)."""
        if self._closed:
            return
        self._closed = True
        self._local.clear()
        if self._fast is not None:
            self._fast.close()  # gives the mapping back (before the segment closes)
        lock = self._lock
        if self._counter_rec >= 0 and not lock.held():
            self._publish()
            try:
                lock.acquire()
                self._counters.release_locked(self._counter_rec, self._object_id)
                self._words[W_WRITING] = 0
            except ShmCacheError:
                pass  # the record is reclaimed once this process is gone
            finally:
                lock.release()
        self._table.release()
        lock.close()
        self._segment.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_attach_pickled, (self._segment.name, self._pickle_options))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"capacity={self.capacity}"
        return f"<SharedMemorySessionCache {self._segment.name!r} {state}>"

    # -- helpers -------------------------------------------------------------------------

    def _bump(self, word: int) -> None:
        """Add one to a header counter (caller holds the lock)."""
        self._words[word] = (self._words[word] + 1) & U64



def _attach_pickled(name: str, options: dict[str, Any]) -> SharedMemorySessionCache:
    return SharedMemorySessionCache.attach(name, **options)
