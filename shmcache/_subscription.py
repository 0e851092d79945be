"""The pub/sub side of ``TieredSessionCache``: the subscriber thread, the subscription that
``poll()`` reads, and the heartbeat that notices a link gone silent.

A subscription can die without an error: a Redis that hangs, a NAT or firewall that drops
an idle flow, a peer that vanished without a FIN. Its socket then stays open and silent,
and nothing reaches this host's table until the TCP stack gives up (minutes, or never).
So each subscription PINGs Redis every ``max_staleness / 4`` seconds; a PING that nothing
answered (no pong, no message) within ``max_staleness / 2`` closes it and subscribes again,
and the new subscription empties the host's table (``TieredSessionCache._subscribed``),
since messages may have been lost in between. The staleness bound itself never depended on
pub/sub (a local copy lives at most S); the heartbeat keeps the prompt path honest.

Layer: above ``shmcache.redis`` (it uses the remote's ``pubsub()``), beside ``tiered``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import CacheUnavailable

if TYPE_CHECKING:
    from .tiered import TieredSessionCache

log = logging.getLogger("shmcache.tiered")

_POLL_SLICE = 0.2  # seconds a subscriber waits for a message before looking at its stop flag
_BACKOFF_MAX = 2.0


class SilentLink(CacheUnavailable):
    """A subscription that did not answer a PING in time."""


class Heartbeat:
    """PING a subscription every ``staleness / 4`` seconds (on ``clock``, real time by
    default: a test's fake clock does not move by itself); ``tick`` raises ``SilentLink``
    when a PING went unanswered for ``staleness / 2``. Anything heard answers it."""

    def __init__(self, staleness: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = staleness / 4
        self.limit = staleness / 2
        self._clock = clock
        self._sent_at: float | None = None
        self._next = clock() + self.interval

    def heard(self) -> None:
        self._sent_at = None

    def tick(self, pubsub: Any) -> None:
        now = self._clock()
        if self._sent_at is not None and now - self._sent_at > self.limit:
            raise SilentLink(
                f"Redis subscription: no answer to a PING for {now - self._sent_at:.3f} s "
                f"(limit {self.limit:.3f} s, half of max_staleness)"
            )
        if self._sent_at is None and now >= self._next:
            pubsub.ping()
            self._sent_at = now
            self._next = now + self.interval


class Subscription:
    """One PubSub on the remote's channel, with its heartbeat; ``read`` hands each
    invalidation to the cache and reports a (re)subscription."""

    def __init__(self, cache: TieredSessionCache, staleness: float) -> None:
        remote = cache.remote
        self._pubsub = remote.pubsub()
        try:
            self._pubsub.subscribe(remote.channel)
        except BaseException:
            self.close()
            raise
        self._heartbeat = Heartbeat(staleness)
        self.slice = min(_POLL_SLICE, self._heartbeat.interval)

    def read(self, cache: TieredSessionCache, timeout: float) -> str | None:
        """Wait up to ``timeout`` for one message and apply it; returns its kind ("message",
        "subscribe", "pong"...) or None. Raises ``SilentLink`` or the client's errors."""
        message = self._pubsub.get_message(timeout=timeout)
        if message is not None:
            self._heartbeat.heard()
        self._heartbeat.tick(self._pubsub)
        if message is None:
            return None
        kind = str(message.get("type"))
        if kind == "subscribe":
            cache._subscribed()
        elif kind == "message":
            cache.apply(message["data"])
        return kind

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pubsub.close()


class Subscriber:
    """A daemon thread that applies invalidation messages to the host's table, and
    resubscribes (with backoff) when the connection is lost or goes silent."""

    def __init__(self, cache: TieredSessionCache) -> None:
        self._cache = weakref.ref(cache)  # the thread must not keep a dropped cache alive
        self._staleness = cache.max_staleness
        self.confirmed = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="shmcache-invalidations", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2 * _POLL_SLICE + 5)

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            subscription = None
            try:
                cache = self._cache()
                if cache is None or cache.closed:
                    return
                subscription = Subscription(cache, self._staleness)
                del cache
                while not self._stop.is_set():
                    cache = self._cache()
                    if cache is None or cache.closed:
                        return
                    if subscription.read(cache, subscription.slice) == "subscribe":
                        self.confirmed.set()
                        backoff = 0.05
                    del cache
            except Exception as exc:  # Redis gone or silent, or the local tier failed
                self.confirmed.clear()
                cache = self._cache()
                if isinstance(exc, SilentLink) and cache is not None:
                    cache._silent_links += 1
                del cache
                log.warning("shmcache: invalidation subscriber: %s; resubscribing", exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                if subscription is not None:
                    subscription.close()
