"""SharedMemorySessionCache against a dict model, driven by hypothesis.

Two cache objects share one segment (``a`` created it, ``b`` attached), as two worker
processes would, with one FakeClock. The model keeps, per token, the latest session set,
its expiry in ms and which object set it.

* Small table (capacity 8: 31 slots, 42 storable tokens): the window and eviction paths run. A get
  may miss a token the model holds only as an eviction: each such loss is checked against
  ``stats()["evictions"]`` (every eviction removes exactly one live entry). A get must never
  return a session the model says is invalidated, expired or cleared, nor any session other
  than the latest set.
* Large table: no eviction may happen, and every get must match the model exactly.

In hash mode a session is only visible to the object that set it; in value mode to both,
unless its encoding is longer than value_size (the pool's long token makes such sessions).

Users (issue 6): each set names one of a few users (or none; ``7`` and ``"7"`` are one
user), and ``invalidate_by_user`` through either object must return the model's count of
that user's live sessions (without eviction; with it, no more than that, and the shortfall
is accounted for by evictions), after which every get of those tokens misses in both.

Leases (issue 11): a get that misses gives its object a lease on the token (the first miss
counts, until it is 10 s old). The object's next set of the token is dropped when, since that
miss, the token was invalidated, its user (named by the set) revoked, or the table cleared,
and when the lease is older than 10 s (a dropped set also removes the token, whoever set
it: the token is a miss everywhere); it may be dropped after any other logout (a bucket
shared with another token: a false drop, allowed, counted by ``lease_drops``); it is never
dropped when no logout happened since. Equal sets: in hash mode a set of the session the
table already holds (another object set it) keeps that object's copy valid.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from unittest import mock

import pytest
from _clock import FakeClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from shmcache import PickleCodec, SharedMemorySessionCache
from shmcache.shm import construct as shm_construct
from shmcache.shm import fast

START_MS = 1_000_000
SMALL = 8  # capacity of the small table: fewer slots than the pool has storable tokens

# 42 storable tokens: more than the small table holds, fewer than one window (96) of the
# large one, so the large table can never evict.
POOL = [f"tok-{i}" for i in range(40)] + ["", "\ud800", "x" * 300]
STORABLE = [t for t in POOL if t]

tickets = st.one_of(st.integers(1, 2_000), st.integers(2_000, 600_000))  # ttl in ms
advances = st.one_of(st.integers(0, 50), st.integers(0, 5_000))
which = st.sampled_from(["a", "b"])
tokens = st.sampled_from(POOL)
USERS: list[str | int | None] = [None, 7, "7", "alice", "bob"]  # 7 and "7": one user
users = st.sampled_from(USERS)
revocable = st.sampled_from([u for u in USERS if u is not None] + ["nobody"])


def _user(user: str | int | None) -> str | None:
    return None if user is None else str(user)


class _FixedSeeds:
    """Stands in for ``secrets`` while a segment is created: deterministic seeds."""

    def randbits(self, k: int) -> int:
        return 0x9E37_79B9_7F4A_7C15 & ((1 << k) - 1)


class CacheModel(RuleBasedStateMachine):
    """Parametrized by class attributes; see ``_run``."""

    make_name: Callable[[], str]
    capacity: int
    value_size: int
    may_evict: bool
    b_pure: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.now_ms = START_MS
        self.clock = FakeClock(START_MS / 1000)
        # Fixed hash seeds: which tokens collide (and so what is evicted) must not change
        # between hypothesis' runs of one example, or it could not replay and shrink it.
        with mock.patch.object(shm_construct, "secrets", _FixedSeeds()):
            self.a = SharedMemorySessionCache.create(
                self.make_name(), capacity=self.capacity, value_size=self.value_size,
                clock=self.clock,
            )
        # b_pure: b runs the pure-Python code whatever a runs (issue 15: the two
        # implementations against one model, on one segment).
        with mock.patch.dict(os.environ, {fast.ENV: "1"} if self.b_pure else {}):
            self.b = SharedMemorySessionCache.attach(self.a.name, clock=self.clock)
        # token -> (session, expiry_ms, objects that may see it, user as str() or None)
        self.model: dict[str, tuple[tuple[str, int], int, str, str | None]] = {}
        self.serial = 0
        self.lost = 0  # live model entries found evicted
        # Logouts in order: ("tok", token), ("user", str(user)) or ("clear", ""); a lease
        # remembers how many there were at its miss, and when (ms).
        self.logouts: list[tuple[str, str]] = []
        self.leases: dict[tuple[str, str], tuple[int, int]] = {}

    def teardown(self) -> None:
        self.b.close()
        self.a.close()
        self.a.unlink()

    def obj(self, name: str) -> SharedMemorySessionCache:
        return self.a if name == "a" else self.b

    def visible_to(self, setter: str, session: object) -> str:
        """Which objects may return a session: all if it is stored in the segment (value
        mode, encoding fits), else only the object that set it."""
        if self.value_size and len(PickleCodec().encode(session)) <= self.value_size:
            return "ab"
        return setter

    @initialize()
    def start_empty(self) -> None:
        assert self.a.stats()["entries"] == 0

    @rule(who=which, tok=tokens, ttl_ms=tickets, user=users)
    def set(self, who: str, tok: str, ttl_ms: int, user: str | int | None) -> None:
        self.serial += 1
        session = (tok, self.serial)
        if not tok:
            with pytest.raises(ValueError):
                self.obj(who).set(tok, session, ttl_ms / 1000, user_id=user)
            return
        if self.leased_set(who, tok, session, ttl_ms, user):
            self.model[tok] = (
                session, self.now_ms + ttl_ms, self.visible_to(who, session), _user(user)
            )

    def leased_set(
        self, who: str, tok: str, session: object, ttl_ms: int, user: str | int | None
    ) -> bool:
        """Set through ``who``, judged against the lease model; True if it was stored."""
        lease = self.leases.pop((who, tok), None)
        drops = self.a.stats()["lease_drops"]
        self.obj(who).set(tok, session, ttl_ms / 1000, user_id=user)
        dropped = self.a.stats()["lease_drops"] > drops
        if lease is None:
            assert not dropped, f"{tok!r}: set with no miss before it was dropped"
            return True
        since_ms, seen = lease
        if self.now_ms - since_ms >= 10_000:
            assert dropped  # an expired lease: not stored
            self.model.pop(tok, None)
            return False
        since = self.logouts[seen:]
        required = any(
            e == ("tok", tok) or e == ("user", _user(user)) or e[0] == "clear" for e in since
        )
        if required:
            assert dropped, f"{tok!r}: a set racing a logout {since} was stored"
        elif dropped:
            assert since, f"{tok!r}: set dropped though nothing was logged out since its miss"
        if dropped:
            self.model.pop(tok, None)  # a dropped set leaves the token a miss everywhere
        return not dropped

    @precondition(lambda self: self.model)
    @rule(who=which, index=st.integers(0, len(POOL)), ttl_ms=tickets)
    def set_equal(self, who: str, index: int, ttl_ms: int) -> None:
        """Set again the session the table holds (another worker validated it too): in hash
        mode the object that set it first keeps its copy."""
        known = sorted(self.model)
        tok = known[index % len(known)]
        session, expiry, visible, user = self.model[tok]
        if expiry <= self.now_ms:
            return
        if self.leased_set(who, tok, session, ttl_ms, user):
            seen = "".join(sorted(set(visible + self.visible_to(who, session))))
            self.model[tok] = (session, self.now_ms + ttl_ms, seen, user)

    @rule(
        who=which, toks=st.lists(st.sampled_from(STORABLE), min_size=10, max_size=40),
        ttl_ms=tickets, user=users,
    )
    def set_many(self, who: str, toks: list[str], ttl_ms: int, user: str | int | None) -> None:
        """A burst of sets: fills the small table so that windows overflow."""
        for i, tok in enumerate(toks):
            self.serial += 1
            session = (tok, self.serial)
            if self.leased_set(who, tok, session, ttl_ms + i, user):
                self.model[tok] = (
                    session, self.now_ms + ttl_ms + i, self.visible_to(who, session),
                    _user(user),
                )

    @rule(who=which, user=revocable)
    def invalidate_by_user(self, who: str, user: str | int) -> None:
        key = str(user)
        live = [t for t, (_, e, _, u) in self.model.items() if u == key and e > self.now_ms]
        self.logouts.append(("user", key))
        dropped = self.obj(who).invalidate_by_user(user)
        if self.may_evict:
            # Entries the model still holds may have been evicted unseen: each eviction
            # removed exactly one live entry, and ``lost`` counts those already found.
            assert dropped <= len(live), f"{user!r}: dropped {dropped}, model has {live}"
            self.lost += len(live) - dropped
            evictions = self.a.stats()["evictions"]
            assert self.lost <= evictions, f"{user!r}: lost {self.lost}, evictions={evictions}"
        else:
            assert dropped == len(live), f"{user!r}: dropped {dropped}, model has {live}"
        self.model = {t: v for t, v in self.model.items() if v[3] != key}
        for tok in live:
            assert self.a.get(tok) is None and self.b.get(tok) is None, f"{tok!r} survived"

    @rule(who=which, tok=tokens)
    def get_one(self, who: str, tok: str) -> None:
        self.get(who, tok)

    def get(self, who: str, tok: str) -> None:
        got = self.obj(who).get(tok)
        if got is None and tok:
            held = self.leases.get((who, tok))
            if held is None or self.now_ms - held[0] >= 10_000:
                self.leases[(who, tok)] = (self.now_ms, len(self.logouts))
        entry = self.model.get(tok)
        if entry is None or entry[1] <= self.now_ms:
            assert got is None, f"{tok!r}: got {got!r}, model says gone"
            return
        session, _, visible, _ = entry
        if who not in visible:
            assert got is None, f"{tok!r}: {who} got {got!r}, only {visible} may see it"
            return
        if got is None:
            assert self.may_evict, f"{tok!r}: live session {session!r} missed"
            self.lost += 1
            evictions = self.a.stats()["evictions"]
            assert self.lost <= evictions, f"{tok!r} lost, evictions={evictions}"
            del self.model[tok]  # gone from the table: it must now miss everywhere
            return
        assert got == session, f"{tok!r}: got {got!r}, latest set is {session!r}"

    @rule(who=which, tok=tokens)
    def invalidate(self, who: str, tok: str) -> None:
        self.logouts.append(("tok", tok))
        self.obj(who).invalidate(tok)
        self.model.pop(tok, None)

    @precondition(lambda self: self.model)
    @rule(who=which, index=st.integers(0, len(POOL)))
    def invalidate_known(self, who: str, index: int) -> None:
        # an index, not a draw from the model's keys: the draws must not depend on what
        # the system under test did, or hypothesis could not replay an example
        known = sorted(self.model)
        tok = known[index % len(known)]
        self.logouts.append(("tok", tok))
        self.obj(who).invalidate(tok)
        del self.model[tok]
        assert self.a.get(tok) is None
        assert self.b.get(tok) is None

    @rule(who=which, now=st.integers(0, 3))
    def clear(self, who: str, now: int) -> None:
        if now:  # only one time in four: a clear undoes the work of filling the table
            return
        self.logouts.append(("clear", ""))
        self.obj(who).clear()
        self.model.clear()

    @rule(ms=advances)
    def advance(self, ms: int) -> None:
        self.now_ms += ms
        self.clock.now = self.now_ms / 1000

    @rule()
    def purge(self) -> None:
        expired = sum(1 for _, e, _, _ in self.model.values() if e <= self.now_ms)
        reclaimed = self.a.purge()
        if not self.may_evict:
            assert reclaimed == expired
        self.model = {k: v for k, v in self.model.items() if v[1] > self.now_ms}

    @invariant()
    def every_get_agrees(self) -> None:
        """Read every token through both objects after every step, so that a lost or stale
        entry is caught at once (each read also runs the model checks of ``get``)."""
        for who in "ab":
            for tok in POOL:
                self.get(who, tok)

    @invariant()
    def whole(self) -> None:
        assert self.a.check() == []
        stats = self.b.stats()
        assert stats["invalid"] == 0
        if not self.may_evict:
            assert stats["evictions"] == 0
            live = sum(1 for _, e, _, _ in self.model.values() if e > self.now_ms)
            assert stats["entries"] == live
        else:
            assert stats["entries"] <= stats["slots"]


def _run(make_name: Callable[[], str], capacity: int, value_size: int, examples: int,
         b_pure: bool = False) -> None:
    class Machine(CacheModel):
        pass

    Machine.b_pure = b_pure
    Machine.make_name = staticmethod(make_name)  # type: ignore[assignment]
    Machine.capacity = capacity
    Machine.value_size = value_size
    Machine.may_evict = capacity <= 64
    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=examples, stateful_step_count=60, deadline=None),
    )


@pytest.mark.parametrize("value_size", [0, 256], ids=["hash", "value"])
def test_small_table_against_model(make_name: Callable[[], str], value_size: int) -> None:
    _run(make_name, capacity=SMALL, value_size=value_size, examples=80)


@pytest.mark.parametrize("value_size", [0, 256], ids=["hash", "value"])
def test_small_table_against_model_with_b_in_pure_python(
    make_name: Callable[[], str], value_size: int
) -> None:
    """The same model with ``b`` forced to pure Python: with the compiled core built, ``a``
    runs it, so every rule mixes the two implementations on one segment (issue 15)."""
    _run(make_name, capacity=SMALL, value_size=value_size, examples=60, b_pure=True)


@pytest.mark.parametrize("value_size", [0, 256], ids=["hash", "value"])
def test_large_table_matches_model_exactly(make_name: Callable[[], str], value_size: int) -> None:
    _run(make_name, capacity=128, value_size=value_size, examples=50)


def test_small_table_really_evicts(make_name: Callable[[], str]) -> None:
    """The small machine's eviction allowance is not vacuous: its pool overfills the table
    (more storable tokens than slots, whatever the hash seeds; at capacity 16 the table has
    63 slots since the load went to 1/2, and 42 tokens evicted only now and then)."""
    clock = FakeClock()
    with SharedMemorySessionCache.create(make_name(), capacity=SMALL, clock=clock) as c:
        assert c.stats()["slots"] < len(STORABLE)
        for tok in STORABLE:
            c.set(tok, tok, 10)
        assert c.stats()["evictions"] > 0
        assert c.check() == []
