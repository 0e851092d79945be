"""``TieredSessionCache``: the host's shared-memory table in front of Redis.

A ``get`` that the local table answers costs what a shared-memory hit costs (plus one dict
lookup for the token's key hash); only a local miss goes to Redis. Logouts reach the other
hosts twice over:

1. promptly: ``invalidate`` deletes the key in Redis and publishes its hash in the same
   transaction; in every process a subscriber (a daemon thread, or your calls to
   ``poll()``) drops that hash from its host's table as the message arrives;
2. for certain: nothing is trusted locally for longer than ``max_staleness`` (S) seconds
   after it was read from Redis. A local entry's TTL is ``min(ttl, S - time spent reading
   it)``, counted from *before* the Redis read, so a copy read before a logout expires at
   most S seconds after that logout, whatever happened to pub/sub, to Redis, or to the
   process in between. After that the next ``get`` asks Redis again.

So a session logged out on one host is accepted by another for at most S seconds (the
bound), and usually for the time a pub/sub message takes (milliseconds). A subscriber that
loses its connection, or whose link goes silent (a PING unanswered: ``_subscription.py``),
drops the host's whole local table when it is back, since it may have missed messages.

``invalidate_by_user`` has the same bound S, by the same two routes: Redis drops the user's
sessions and publishes the user's hash (``b"u:<hash>"``) in one transaction, and each
host's subscriber drops that user's local copies (``invalidate_by_user`` on the local tier,
whose entries are filed under the same hash); a copy that missed the message still dies S
seconds after the Redis read that made it, and that read began before the revocation.

Leases (``shmcache/_leases.py``) live in the remote: a ``get`` that misses on both tiers
takes the lease there, and a ``set`` the remote drops (a logout since, on any host) drops
this host's copy and stores nothing locally. The local tier's own leases on key hashes keep
a copy read from Redis out of the table if its invalidation was applied during the read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _args
from ._closing import ClosesOnExit
from ._errors import CacheUnavailable, InvalidArgument, InvalidType
from ._protocol import SessionCache, UserIdOf, UserSessionCache
from ._remote import LeaseDropped, RemoteTier
from ._subscription import SilentLink, Subscriber, Subscription

Clock = Callable[[], float]
_MEMO_MAX = 65536  # token -> key hash memo entries before it is emptied and refilled
_HEX = frozenset("0123456789abcdef")

_instances: weakref.WeakSet[TieredSessionCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # Threads do not survive fork, and the parent's pub/sub socket is not ours to read.
    for cache in list(_instances):
        cache._forget_subscriber()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TieredSessionCache(ClosesOnExit):
    """A host-local ``SessionCache`` (usually ``SharedMemorySessionCache`` with a value
    area) in front of a ``RedisSessionCache`` that every host shares.

    ``max_staleness`` (S, seconds, default 1) bounds how long a logout on another host can
    go unseen here when pub/sub fails; smaller S means more Redis reads (each active token
    at most once per S per host). ``subscribe=True`` (default) runs one daemon thread per
    process, started at the first call in that process (so after a gunicorn fork too);
    ``subscribe=False`` leaves it to you to call ``poll()``. ``fail_open`` is the remote's:
    with it, a Redis outage turns local misses into misses instead of errors, while local
    hits go on for at most S. ``invalidate`` and ``clear`` act on both tiers and raise
    ``CacheUnavailable`` if Redis could not be told. ``clock`` measures the time a Redis read
    took (tests pass the local tier's fake clock).

    Local entries are stored under the token's key hash, never the token, so the hashes
    published by other hosts find them. A local tier without a value area still works, but
    each worker then fetches from Redis what another worker set.

    Users: ``set(..., user_id=)`` (or ``user_id_of(session)``) files the session under its
    user in Redis, and its local copy under the user's keyed hash (never the raw id); a copy
    read from Redis keeps the owner it was stored with. ``invalidate_by_user`` deletes the
    user's sessions in Redis and drops their copies on every host, within the bound S above.
    A local tier without ``invalidate_by_user`` is emptied instead.
    """

    def __init__(
        self,
        local: SessionCache,
        remote: RemoteTier,
        *,
        max_staleness: float = 1.0,
        subscribe: bool = True,
        clock: Clock | None = None,
        user_id_of: UserIdOf | None = None,
    ) -> None:
        if not isinstance(local, SessionCache):
            raise InvalidArgument(f"local must be a SessionCache, got {type(local).__name__}")
        if not isinstance(remote, RemoteTier):
            raise InvalidArgument(
                "remote must be a RedisSessionCache or a DatabaseSessionCache (PostgreSQL), "
                f"got {type(remote).__name__}"
            )
        if not isinstance(subscribe, bool):
            raise InvalidArgument(f"subscribe must be True or False, got {subscribe!r}")
        if user_id_of is not None and not callable(user_id_of):
            raise InvalidType(f"user_id_of must be callable, got {type(user_id_of).__name__}")
        self._local = local
        self._local_users = local if isinstance(local, UserSessionCache) else None
        self._user_id_of = user_id_of
        self._remote = remote
        self._staleness = _args.positive_number("max_staleness", max_staleness)
        self._clock: Clock = clock if clock is not None else time.monotonic
        self._memo: dict[str, str] = {}
        self._subscribe = subscribe
        self._start_pending = subscribe  # checked on every call: a bool, not a getpid()
        self._subscriber: Subscriber | None = None
        self._polled: Subscription | None = None  # poll()'s subscription
        self._guard = threading.Lock()
        self._closed = False
        self._local_hits = 0
        self._remote_hits = 0
        self._misses = 0
        self._messages = 0
        self._resubscribes = 0
        self._silent_links = 0
        self._lease_drops = 0
        remote.add_secret_listener(self._secret_changed)
        _instances.add(self)

    # -- the SessionCache protocol -------------------------------------------------------

    def get(self, token: str) -> Any | None:
        """The session for ``token``: from the host's table if it has a copy younger than
        S seconds, else from Redis (and copied locally)."""
        if self._start_pending:
            self._start_subscriber()
        key = self._memo.get(token) if type(token) is str else None
        if key is None:
            _args.check_token(token)
            if not token:
                self._misses += 1
                return None
            try:
                key = self._key(token)
            except CacheUnavailable:
                if not self._remote.fail_open:
                    raise
                self._misses += 1
                return None
        session = self._local.get(key)
        if session is not None:
            self._local_hits += 1
            return session
        return self._get_remote(token)

    def _get_remote(self, token: str) -> Any | None:
        started = self._clock()
        try:
            found = self._remote.lookup(token)
        except CacheUnavailable:
            if not self._remote.fail_open:
                raise
            found = None
        if found is None:
            self._misses += 1
            return None
        session, left, key, owner = found
        # Counted from before the read: a copy read before a logout dies S after it.
        ttl = min(left, self._staleness - (self._clock() - started))
        if ttl > 0:
            self._set_local(key, session, ttl, owner)
        self._remote_hits += 1
        return session

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        """Write ``session`` to Redis, filed under ``user_id`` (or ``user_id_of(session)``),
        then to the host's table for at most S seconds; to neither, dropping this host's
        copy, if a logout came since this thread's miss of ``token`` (leases)."""
        ttl = _args.check_set_args(token, ttl_seconds)
        if user_id is None and self._user_id_of is not None:
            user_id = self._user_id_of(session)
        user = self._remote.user_of(session, user_id)  # else the remote's user_id_of
        if self._start_pending:
            self._start_subscriber()
        try:
            key, owner = self._remote.store(token, session, ttl, user)
        except LeaseDropped as dropped:  # the remote deleted its entry: so does this host
            self._lease_drops += 1
            self._remember(token, dropped.key)
            self._local.invalidate(dropped.key)
            return
        except CacheUnavailable:
            if not self._remote.fail_open:
                raise
            return  # counted; stored nowhere, as RedisSessionCache does: the next get revalidates
        self._remember(token, key)
        self._set_local(key, session, min(ttl, self._staleness), owner)

    def invalidate(self, token: str) -> None:
        """Delete ``token`` in Redis, announce it to every host, and drop the local copy.
        Raises ``CacheUnavailable`` (after dropping the local copy it can name) rather than
        return without Redis having deleted it."""
        _args.check_token(token)
        if not token:
            return
        key = None
        try:
            key = self._remote.remove(token)
        finally:
            # Redis unreachable: drop the copy under the hash we can still compute.
            key = key or self._memo.get(token) or self._remote.cached_key_of(token)
            if key is not None:
                self._local.invalidate(key)

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Delete every session of ``user_id`` in Redis, announce it to every host, and drop
        this host's copies; returns how many live sessions Redis held (local copies are
        copies of those, not counted again). Other hosts drop theirs when the message lands,
        and in any case within S seconds. Raises ``CacheUnavailable`` (after dropping the
        local copies it can name) rather than return without Redis having deleted them."""
        user = _args.user_key(user_id)
        if self._start_pending:
            self._start_subscriber()
        owner = None
        try:
            dropped, owner = self._remote.revoke(user)
        finally:
            owner = owner or self._remote.cached_owner_of(user)
            if owner is not None:
                self._drop_local_user(owner)
        return dropped

    def clear(self) -> None:
        """Delete every session in Redis (announced to every host) and on this host."""
        try:
            self._remote.clear()
        finally:
            self._local.clear()

    # -- invalidation messages -----------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> int:
        """Apply the invalidation messages that arrived (waiting up to ``timeout`` seconds
        for the first); returns how many. For ``subscribe=False``; the first call
        subscribes (and applies nothing older). Raises ``CacheUnavailable``, also when the
        subscription did not answer a PING (sent by an earlier call) within S / 2: call it
        at least every S / 4 seconds, or the link is declared silent."""
        if self._subscribe:
            raise InvalidArgument("poll() is for subscribe=False: a subscriber thread runs")
        remote = self._remote
        handled = 0
        try:
            if self._polled is None:
                self._polled = Subscription(self, self._staleness)
            wait = timeout
            while True:
                kind = self._polled.read(self, wait)
                if kind is None:
                    return handled
                wait = 0.0
                handled += kind == "message"
        except SilentLink:
            self._silent_links += 1
            self._drop_polled()
            raise
        except remote.unavailable_errors as exc:
            self._drop_polled()
            raise CacheUnavailable(f"Redis subscription failed: {exc}") from exc

    def apply(self, data: bytes) -> None:
        """Apply one invalidation message (``b"i:<hash>"``, ``b"u:<user hash>"`` or
        ``b"c"``) to the host's table."""
        self._messages += 1
        if data.startswith(b"i:"):
            self._local.invalidate(data[2:].decode("ascii", "replace"))
        elif data.startswith(b"u:"):
            owner = data[2:].decode("ascii", "replace")
            if len(owner) == 32 and _HEX.issuperset(owner):
                self._drop_local_user(owner)
        elif data == b"c":
            self._local.clear()
        # anything else is from a newer version or another program: not ours to act on

    @property
    def remote(self) -> RemoteTier:
        return self._remote

    @property
    def max_staleness(self) -> float:
        return self._staleness

    @property
    def subscribed(self) -> bool:
        """True while this process's subscription is confirmed by Redis."""
        subscriber = self._subscriber
        return subscriber is not None and subscriber.confirmed.is_set()

    def wait_subscribed(self, timeout: float) -> bool:
        """Start the subscriber if needed and wait until Redis confirmed it (readiness
        checks, tests); False if it was not confirmed within ``timeout`` seconds."""
        if self._start_pending:
            self._start_subscriber()
        subscriber = self._subscriber
        return subscriber is not None and subscriber.confirmed.wait(timeout)

    # -- figures and lifetime ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This process's figures, with each tier's own ``stats()`` (if it has one)."""
        local_stats = getattr(self._local, "stats", None)
        return {
            "backend": "tiered",
            "max_staleness": self._staleness,
            "local_hits": self._local_hits,
            "remote_hits": self._remote_hits,
            "hits": self._local_hits + self._remote_hits,
            "misses": self._misses,
            "messages": self._messages,
            "resubscribes": self._resubscribes,
            "silent_links": self._silent_links,
            "lease_drops": self._lease_drops,
            "subscribed": self.subscribed,
            "local": local_stats() if callable(local_stats) else {},
            "remote": self._remote.stats(),
        }

    def close(self) -> None:
        """Stop the subscriber, then close both tiers."""
        if self._closed:
            return
        self._closed = True
        self._start_pending = False
        with self._guard:
            subscriber, self._subscriber = self._subscriber, None
        if subscriber is not None:
            subscriber.stop()
        self._drop_polled()
        try:
            self._remote.close()
        finally:
            close = getattr(self._local, "close", None)
            if callable(close):
                close()

    def __repr__(self) -> str:
        return f"<TieredSessionCache {self._local!r} in front of {self._remote!r}>"

    # -- helpers -------------------------------------------------------------------------

    def _key(self, token: str) -> str:
        key = self._remote.key_of(token)
        self._remember(token, key)
        return key

    def _remember(self, token: str, key: str) -> None:
        memo = self._memo
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[token] = key

    def _set_local(self, key: str, session: Any, ttl: float, owner: str | None) -> None:
        if owner is not None and self._local_users is not None:
            self._local_users.set(key, session, ttl, user_id=owner)
        else:  # a tier without users: _drop_local_user empties it instead
            self._local.set(key, session, ttl)

    def _drop_local_user(self, owner: str) -> None:
        if self._local_users is not None:
            self._local_users.invalidate_by_user(owner)
        else:
            self._local.clear()

    def _secret_changed(self) -> None:
        # Every key hash handed out so far names a key space nobody uses any more.
        self._memo.clear()
        with contextlib.suppress(Exception):
            self._local.clear()

    def _subscribed(self) -> None:
        """A subscription was confirmed: if it is a re-subscription (ours, or redis-py's
        after a reconnect), messages may have been lost in between, so nothing copied
        locally before can be vouched for."""
        self._resubscribes += 1
        if self._resubscribes > 1:
            self._local.clear()

    def _start_subscriber(self) -> None:
        with self._guard:
            if not self._start_pending or self._closed:
                return
            self._start_pending = False
            self._subscriber = Subscriber(self)

    def _forget_subscriber(self) -> None:
        self._subscriber = None
        self._polled = None
        self._guard = threading.Lock()
        self._resubscribes = 0
        self._start_pending = self._subscribe and not self._closed

    def _drop_polled(self) -> None:
        polled, self._polled = self._polled, None
        if polled is not None:
            polled.close()
