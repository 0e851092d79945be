"""The pub/sub link of ``TieredSessionCache`` going silent without an error.

Redis is paused (SIGSTOP): every socket to it stays open and nothing answers, which is what
a hung server, a NAT that dropped the flow or a vanished peer look like. The TCP stack
would not notice for minutes, if ever; the subscription's PING (every S / 4, unanswered
for S / 2) does, the subscriber subscribes again, and the new subscription empties the
host's table, since messages may have been lost in between. S here is real time (the
heartbeat does not follow a test's fake clock); the assertions are on counts and states,
with the suite's generous timeout only turning a hang into a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from _redis_support import TIMEOUT, eventually, tiered

from shmcache import CacheUnavailable
from shmcache._subscription import Heartbeat, SilentLink

S = 0.4  # max_staleness of these tests: PING every 0.1 s, silent after 0.2 s


def test_silent_subscription_is_noticed_and_replaced(
    own_redis: Any, redis_prefix: str, make_name: Callable[[], str], clock: Any
) -> None:
    with tiered(
        own_redis.url, make_name(), clock, prefix=redis_prefix, staleness=S, subscribe=True,
        timeout=0.5,
    ) as b:
        assert b.wait_subscribed(TIMEOUT)
        b.set("tok", "s", 60)
        key = b.remote.key_of("tok")
        assert b._local.get(key) == "s"
        own_redis.pause()
        try:
            eventually(lambda: not b.subscribed, "the silent link noticed")
            assert b.stats()["silent_links"] >= 1
        finally:
            own_redis.resume()
        eventually(lambda: b.subscribed, "the new subscription")
        assert b._local.get(key) is None  # messages may have been lost: nothing vouched for
        assert b.get("tok") == "s"  # from Redis again
        assert b.stats()["remote_hits"] == 1


def test_poll_notices_a_silent_subscription(
    own_redis: Any, redis_prefix: str, make_name: Callable[[], str], clock: Any
) -> None:
    with tiered(
        own_redis.url, make_name(), clock, prefix=redis_prefix, staleness=S, timeout=0.5
    ) as b:
        b.poll(TIMEOUT)  # subscribes, and waits for the confirmation
        b.set("tok", "s", 60)
        key = b.remote.key_of("tok")
        own_redis.pause()

        def silent() -> bool:
            try:
                b.poll(0.02)
            except CacheUnavailable as exc:
                assert isinstance(exc, SilentLink) and "PING" in str(exc)
                return True
            return False

        try:
            eventually(silent, "the silent link noticed by poll()")
            assert b.stats()["silent_links"] == 1
        finally:
            own_redis.resume()
        eventually(lambda: b.poll(0.05) >= 0 and b.stats()["resubscribes"] == 2, "resubscribed")
        assert b._local.get(key) is None


class _Recorder:
    def __init__(self) -> None:
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1


@pytest.mark.parametrize("answered", [True, False])
def test_heartbeat_schedule(answered: bool) -> None:
    """PING every S / 4; silent only when a PING went S / 2 without anything heard."""
    now = [0.0]
    beat = Heartbeat(1.0, clock=lambda: now[0])
    link = _Recorder()
    beat.tick(link)
    assert link.pings == 0  # not due yet
    now[0] = 0.25
    beat.tick(link)
    assert link.pings == 1
    now[0] = 0.5
    beat.tick(link)  # one PING outstanding at a time
    assert link.pings == 1
    if answered:
        beat.heard()  # the pong (or any message)
        now[0] = 0.8
        beat.tick(link)
        assert link.pings == 2
    else:
        now[0] = 0.75
        beat.tick(link)  # exactly S / 2: still within the limit
        now[0] = 0.76
        with pytest.raises(SilentLink):
            beat.tick(link)
