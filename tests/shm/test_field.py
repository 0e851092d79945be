"""Issue 11 on the shared-memory backend: equal sets keep other processes' copies, large
sessions are never silently unshared, pydantic sessions, and leases across processes."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from typing import Any

import pytest
from _clock import FakeClock
from pydantic import BaseModel

from shmcache import PydanticCodec, SharedMemorySessionCache

FORK = multiprocessing.get_context("fork")
TIMEOUT = 60.0


class Session(BaseModel):
    """The seed's session model."""

    id: int
    token: str
    created_at: str
    expires_at: str


def make_session(i: int, pad: int = 0) -> Session:
    token = f"tok{i:04d}." + "t" * 120 + "x" * pad
    return Session(id=i, token=token, created_at="2026-11-29T10:00:00+00:00",
                   expires_at="2026-11-30T10:00:00+00:00")


def in_child(fn: Any) -> Any:
    parent_end, child_end = FORK.Pipe(duplex=False)

    def body() -> None:
        try:
            child_end.send(("ok", fn()))
        except BaseException as exc:
            child_end.send(("fail", f"{type(exc).__name__}: {exc}"))

    p = FORK.Process(target=body, daemon=True)
    p.start()
    assert parent_end.poll(TIMEOUT), "child hung"
    status, payload = parent_end.recv()
    p.join(TIMEOUT)
    assert status == "ok", payload
    return payload


# -- equal sets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_size", [0, 512])
def test_an_equal_set_elsewhere_keeps_this_process_copy(segment_name: str, value_size: int) -> None:
    """Worker A caches a session; worker B validates the same token and sets an equal
    session: A still hits, with its own object (no validation, no decode). A different
    session set by B makes A miss or see B's (never A's old one)."""
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=value_size, codec=PydanticCodec(Session)
    )
    try:
        mine = make_session(1)
        cache.set("T", mine, 60)
        assert cache.get("T") is mine

        def other_worker_sets(session: Session) -> bool:
            other = SharedMemorySessionCache.attach(segment_name, codec=PydanticCodec(Session))
            other.set("T", session, 60)
            return other.get("T") == session

        assert in_child(lambda: other_worker_sets(make_session(1)))  # equal, another object
        assert cache.get("T") is mine  # kept: the slot changed, its fingerprint did not
        changed = make_session(1).model_copy(update={"expires_at": "2026-12-01T00:00:00+00:00"})
        assert in_child(lambda: other_worker_sets(changed))
        got = cache.get("T")
        assert got is not mine
        assert got == (changed if value_size else None)
        cache.invalidate("T")
        assert cache.get("T") is None
    finally:
        cache.close()


def test_equal_sets_extend_the_entry_for_every_holder(segment_name: str) -> None:
    """An equal set's later expiry is adopted by the processes that keep their copy."""
    clock = FakeClock()
    a = SharedMemorySessionCache.create(segment_name, capacity=64, clock=clock)
    b = SharedMemorySessionCache.attach(segment_name, clock=clock)
    try:
        a.set("T", {"user": 1}, 10)
        b.set("T", {"user": 1}, 10)  # b validated it too
        clock.advance(8)
        b.set("T", {"user": 1}, 10)  # and again, later: the entry now ends at 18
        clock.advance(5)  # 13: past a's own expiry, within the entry's
        assert a.get("T") == {"user": 1}
        clock.advance(6)  # 19
        assert a.get("T") is None and b.get("T") is None
    finally:
        b.close()
        a.close()


# -- sessions larger than value_size ------------------------------------------------------------


def test_oversize_sessions_are_counted_and_logged_once(
    segment_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from shmcache.shm import local

    local._warned_oversize = False  # once per process: this test wants to see it
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=128, codec=PydanticCodec(Session)
    )
    try:
        with caplog.at_level(logging.WARNING, logger="shmcache"):
            for i in range(3):
                cache.set(f"T{i}", make_session(i), 60)  # ~250 bytes of JSON
        warnings = [r for r in caplog.records if "value_size" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "128" in warnings[0].getMessage()
        assert cache.stats()["oversize"] == 3
        assert cache.get("T0") == make_session(0)  # still a hit where it was set
        assert in_child(lambda: SharedMemorySessionCache.attach(
            segment_name, codec=PydanticCodec(Session)).get("T0")) is None
    finally:
        cache.close()


@pytest.mark.parametrize("pad", [0, 600, 2000, 3800])
def test_pydantic_sessions_up_to_4k_are_shared(segment_name: str, pad: int) -> None:
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=4096, codec=PydanticCodec(Session)
    )
    try:
        session = make_session(7, pad)
        size = len(PydanticCodec(Session).encode(session))
        assert (pad == 0 and size < 300) or size > pad
        cache.set("T", session, 60)
        got = in_child(lambda: SharedMemorySessionCache.attach(
            segment_name, codec=PydanticCodec(Session)).get("T"))
        assert got == session and isinstance(got, Session)
        assert cache.stats()["oversize"] == 0
    finally:
        cache.close()


def test_pydantic_codec_refuses_what_it_cannot_round_trip() -> None:
    codec = PydanticCodec(Session)
    with pytest.raises(TypeError, match="Session"):
        codec.encode({"id": 1})
    with pytest.raises(TypeError, match="pydantic"):
        PydanticCodec(dict)
    with pytest.raises(ValueError):
        codec.decode(b'{"id": "not an int"}')


# -- leases across processes ---------------------------------------------------------------------


def test_a_logout_in_another_process_voids_a_racing_validation(segment_name: str) -> None:
    """The field's race, provoked: a request misses and 'validates' (reads the row); the
    logout lands in another process (row deleted, invalidate returned); then the request's
    set arrives. The token must not become a hit anywhere."""
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=256)
    try:
        assert cache.get("V") is None  # the miss: this thread now holds a lease
        session = {"user": "victim"}  # what the database said before the logout
        in_child(lambda: SharedMemorySessionCache.attach(segment_name).invalidate("V"))
        cache.set("V", session, 60)  # the late set of the racing validation
        assert cache.get("V") is None
        assert in_child(lambda: SharedMemorySessionCache.attach(segment_name).get("V")) is None
        stats = cache.stats()
        assert stats["lease_drops"] == 1 and stats["process_lease_drops"] == 1
        cache.set("V", session, 60)  # a later login (no miss before it): cached again
        assert cache.get("V") == session
    finally:
        cache.close()


def test_leases_are_per_thread_and_need_a_logout(segment_name: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=256)
    try:
        assert cache.get("A") is None
        cache.set("A", 1, 60)  # a miss, no logout since: cached
        assert cache.get("A") == 1
        assert cache.get("B") is None  # this thread's lease...
        done = []
        t = threading.Thread(target=lambda: done.append(cache.invalidate("B")))
        t.start()
        t.join(TIMEOUT)
        cache.set("B", 2, 60)  # ...voided by another thread's logout
        assert cache.get("B") is None
        other: list[Any] = []

        def other_thread() -> None:
            cache.invalidate("C")
            cache.set("C", 3, 60)  # no miss in this thread: a fresh login, cached
            other.append(cache.get("C"))

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(TIMEOUT)
        assert other == [3]
    finally:
        cache.close()


@pytest.mark.parametrize("logout", ["user", "clear"])
def test_user_revocation_and_clear_void_leases(segment_name: str, logout: str) -> None:
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=256)
    try:
        assert cache.get("U") is None
        if logout == "user":
            in_child(lambda: SharedMemorySessionCache.attach(segment_name).invalidate_by_user(9))
        else:
            in_child(lambda: SharedMemorySessionCache.attach(segment_name).clear())
        cache.set("U", {"user": 9}, 60, user_id=9)
        assert cache.get("U") is None
    finally:
        cache.close()


def test_an_expired_lease_is_not_cached(segment_name: str) -> None:
    clock = FakeClock()
    cache = SharedMemorySessionCache.create(
        segment_name, capacity=64, value_size=256, clock=clock, lease_timeout=5
    )
    try:
        assert cache.get("E") is None
        clock.advance(5)
        cache.set("E", 1, 60)
        assert cache.get("E") is None
        assert cache.get("E") is None  # a new miss, a new lease
        cache.set("E", 1, 60)
        assert cache.get("E") == 1
    finally:
        cache.close()


def test_equal_pydantic_sessions_match_across_interpreters(segment_name: str) -> None:
    """Hash-only, no codec: another interpreter (another hash seed, as uvicorn's spawned
    workers have) sets an equal pydantic session; this process keeps its copy. A pydantic
    model's pickle differs between interpreters (a set of field names), so the fingerprint
    must not come from it; this failed when it did."""
    import os
    import subprocess
    import sys

    cache = SharedMemorySessionCache.create(segment_name, capacity=64)
    try:
        mine = make_session(3)
        cache.set("T", mine, 60)
        code = (
            "from pydantic import BaseModel\n"
            "from shmcache import SharedMemorySessionCache\n"
            "class Session(BaseModel):\n"
            "    id: int\n    token: str\n    created_at: str\n    expires_at: str\n"
            f"s = Session.model_validate_json({PydanticCodec(Session).encode(mine)!r})\n"
            f"SharedMemorySessionCache.attach({segment_name!r}).set('T', s, 60)\n"
        )
        for seed in ("1", "2", "random"):
            done = subprocess.run(
                [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                capture_output=True, text=True, timeout=TIMEOUT,
            )
            assert done.returncode == 0, done.stderr
            assert cache.get("T") is mine, f"copy dropped after a set with hash seed {seed}"
    finally:
        cache.close()
