"""Leases (issue 11) against a model, driven by hypothesis, on every backend that keeps them
(``LEASES`` in tests/test_contract.py): random interleavings of gets, sets, the three kinds
of logout and clock moves, through two objects on one store (``a`` and ``b``: two workers;
for ``shm+redis``, two workers of one host, so that logouts reach both without waiting for
pub/sub, which tests/redis_backend/test_tiered.py covers).

The model keeps, per (object, token), the lease a miss gave (when, and how many logouts had
happened); per token, the latest stored session. After each ``set`` the setter reads the
token back, and:

* no lease (no miss since its last set), or a lease with no logout of anything since and
  younger than 10 s: the session must be stored;
* a lease older than 10 s, or with a logout since of that token, of the set's user, or a
  clear: the set must be dropped, and the token is then a miss everywhere;
* a lease with only other logouts since: either on the shared-memory table (a logout in
  the same bucket may drop it: ``FALSE_DROPS``); stored on the others.

A ``get`` may return only the latest stored session of a token (unexpired), or miss (hash
mode keeps a copy per object); ``invalidate_by_user`` returns the model's count of the
user's live sessions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from _clock import FakeClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from test_contract import BACKENDS, LEASES

from shmcache import SharedMemorySessionCache, TieredSessionCache, open_cache

TIMEOUT = 10.0  # the default lease_timeout
TTL = 60.0
TOKENS = ["t0", "t1", "t2"]
USERS: list[str | None] = [None, "alice", "bob"]
SESSIONS = ["s0", "s1", "s2"]  # few: equal sets happen

which = st.sampled_from(["a", "b"])
tokens = st.sampled_from(TOKENS)
users = st.sampled_from(USERS)
sessions = st.sampled_from(SESSIONS)
advances = st.sampled_from([0.0, 0.5, 4.0, 9.999, 10.0, 30.0])
# Backends whose leases may also drop a set after a logout of another token or user (the
# shared-memory table marks buckets); the others must store it.
FALSE_DROPS = {"shm-hash", "shm-value"}


def _peer(backend: str, cache: Any, clock: Any, make_name: Callable[[], str]) -> Any:
    """Another worker on the same store; for a tiered cache, on the same host: the URL of
    another host, with this host's segment."""
    url, options = LEASES[backend](cache, make_name)
    if isinstance(cache, TieredSessionCache):
        local = cache._local
        assert isinstance(local, SharedMemorySessionCache)
        url = re.sub(r"([?&])shm=[^&]*", rf"\g<1>shm={local.name}", url)
    return open_cache(url, clock=clock, **options)


class LeaseModel(RuleBasedStateMachine):
    backend: str
    make_name: Callable[[], str]
    false_drops: bool

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.a = BACKENDS[self.backend](self.clock, self.make_name)
        self.b = _peer(self.backend, self.a, self.clock, self.make_name)
        self.logouts: list[tuple[str, str]] = []  # ("tok", t), ("user", u), ("clear", "")
        self.leases: dict[tuple[str, str], tuple[float, int]] = {}
        # token -> (session, user, expiry): the latest stored session
        self.stored: dict[str, tuple[str, str | None, float]] = {}

    def teardown(self) -> None:
        self.b.close()
        self.a.close()

    def obj(self, who: str) -> Any:
        return self.a if who == "a" else self.b

    def read(self, who: str, tok: str) -> Any:
        """A get, checked against the model; a miss gives ``who`` a lease (the first miss
        counts until it is 10 s old)."""
        got = self.obj(who).get(tok)
        latest = self.stored.get(tok)
        live = latest is not None and self.clock.now < latest[2]
        assert got is None or (live and latest is not None and got == latest[0]), (
            who, tok, got, latest,
        )
        if got is None:
            held = self.leases.get((who, tok))
            if held is None or self.clock.now - held[0] >= TIMEOUT:
                self.leases[(who, tok)] = (self.clock.now, len(self.logouts))
        return got

    @rule(who=which, tok=tokens)
    def get(self, who: str, tok: str) -> None:
        self.read(who, tok)

    @rule(who=which, tok=tokens, session=sessions, user=users)
    def set(self, who: str, tok: str, session: str, user: str | None) -> None:
        lease = self.leases.pop((who, tok), None)
        must, may = "store", False
        if lease is not None:
            since = self.logouts[lease[1]:]
            voiding = {("tok", tok), ("clear", "")} | ({("user", user)} if user else set())
            if self.clock.now - lease[0] >= TIMEOUT or voiding & set(since):
                must = "drop"
            elif since:
                may = self.false_drops
        self.obj(who).set(tok, session, TTL, user_id=user)
        # The setter reads it back (not through read(): the model is not updated yet).
        got = self.obj(who).get(tok)
        if must == "drop":
            assert got is None, ("a set that had to be dropped was stored", who, tok)
        elif not may:
            assert got == session, ("a set that had to be stored was not", who, tok, got)
        else:
            assert got in (None, session)
        if got is None:
            self.stored.pop(tok, None)  # a dropped set leaves the token a miss everywhere
            self.leases[(who, tok)] = (self.clock.now, len(self.logouts))  # that miss
        else:
            self.stored[tok] = (session, user, self.clock.now + TTL)

    @rule(who=which, tok=tokens)
    def invalidate(self, who: str, tok: str) -> None:
        self.obj(who).invalidate(tok)
        self.logouts.append(("tok", tok))
        self.stored.pop(tok, None)

    @rule(who=which, user=st.sampled_from(["alice", "bob"]))
    def invalidate_by_user(self, who: str, user: str) -> None:
        mine = [t for t, (_, u, expiry) in self.stored.items() if u == user]
        live = sum(self.clock.now < self.stored[t][2] for t in mine)
        assert self.obj(who).invalidate_by_user(user) == live
        self.logouts.append(("user", user))
        for t in mine:
            del self.stored[t]

    @rule(who=which)
    def clear(self, who: str) -> None:
        self.obj(who).clear()
        self.logouts.append(("clear", ""))
        self.stored.clear()

    @rule(seconds=advances)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture(params=sorted(LEASES))
def lease_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_leases_against_the_model(lease_backend: str, make_name: Callable[[], str]) -> None:
    model = type(
        f"LeaseModel_{lease_backend}",
        (LeaseModel,),
        {
            "backend": lease_backend,
            "make_name": staticmethod(make_name),
            "false_drops": lease_backend in FALSE_DROPS,
        },
    )
    run_state_machine_as_test(
        model, settings=settings(max_examples=40, stateful_step_count=40, deadline=None)
    )
