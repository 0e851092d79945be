"""The Redis operations one cache is made of: keyed hashes, MAC'd values, one script a call.

``RedisStore`` is what ``TieredSessionCache`` builds on (read with the time left, write and
get the hashes back, delete and publish); ``RedisSessionCache`` (``cache.py``) is the
``SessionCache`` on top of it, with the argument checks, ``fail_open`` and the figures.

Each call is one Lua script (``scripts.py``) on the node that owns the cache's hash slot
(``keys.py`` draws the keys; ``link.py`` sends the scripts, on one Redis, behind Sentinel or
on a cluster); the script first checks the secret's fingerprint (``keyring.py``) and does
nothing if it is not this client's. Values are packed and MAC'd by ``values.py``.

Leases (``shmcache/_leases.py``, the per-thread bookkeeping every backend shares): a
``lookup`` that misses keeps, for the calling thread, the stamp the ``get`` script handed
back with the miss; the thread's next ``store`` of the token sends it to the ``set``
script, which refuses the write if a logout came since (``scripts.py`` explains the logout
clock and marks). A ``lookup`` that could not reach Redis leaves a void lease: nothing is
known about the logouts of that moment, so the set that follows is not stored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _args
from .._errors import CacheClosed, CacheUnavailable, InvalidType
from .._leases import EXPIRED, NO_LEASE, Leases
from .._remote import LeaseDropped, RemoteSessionCache
from ..codecs import Codec, JsonCodec
from . import scripts, values
from .keyring import Keyring, Listener
from .keys import Keys
from .link import Link
from .scripts import Script
from .secret import Secret

Clock = Callable[[], float]
T = TypeVar("T")

_SECRET_TRIES = 3  # a secret replaced twice during one call means someone keeps deleting it
_SCAN_COUNT = 1000
_MAX_LEASE_MS = 1 << 40  # 35 years: a longer lease_timeout is this (Lua counts exactly)
_VOID: Any = object()  # the stamp of a lease granted when Redis could not be asked


def lease_ms(lease_timeout: float) -> int:
    """``lease_timeout`` (seconds, already checked) as the scripts' ARGV[3]."""
    return min(_MAX_LEASE_MS, max(1, math.ceil(lease_timeout * 1000)))


class RedisStore(RemoteSessionCache):
    """One cache's keys in Redis (see the module docstring); ``CacheUnavailable`` when
    Redis cannot be reached or refuses, ``SecretMismatch`` when the prefix's fingerprint
    is another secret's."""

    def __init__(
        self,
        link: Link,
        keys: Keys,
        keyring: Keyring,
        codec: Codec,
        clock: Clock | None,
        min_replicas: int,
        replica_timeout: float,
        lease_timeout: float,
    ) -> None:
        self._link = link
        self._keys = keys
        self._keyring = keyring
        self._codec = codec
        self._clock = clock
        self._min_replicas = min_replicas
        self._replica_timeout = replica_timeout
        self._closed = False
        self._decode_errors = 0
        self._leases = Leases(lease_timeout, clock)
        self._lease_drops = 0  # this object's sets not stored because their lease was void

    def key_of(self, token: str) -> str:
        """The 32-hex-digit keyed hash that stands for ``token`` in Redis and in messages.
        It starts a ``get`` of ``TieredSessionCache``: if Redis cannot be asked for the
        secret, that get is a miss that knows nothing of logouts, so this thread's lease on
        ``token`` is void (as in ``lookup``)."""
        self._ensure_open()
        try:
            return self._hash(self._keyring.current("get"), token)
        except CacheUnavailable:
            self._leases.grant(token, _VOID)
            raise

    def cached_key_of(self, token: str) -> str | None:
        """``key_of(token)`` if it needs no call to Redis (the secret is known), else None."""
        secret = self._keyring.known
        return None if secret is None else self._hash(secret, token)

    def owner_of(self, user: str) -> str:
        """The 32-hex-digit keyed hash that stands for a user (``user_key`` form)."""
        self._ensure_open()
        return self._owner(self._keyring.current("get"), user).hex()

    def cached_owner_of(self, user: str) -> str | None:
        """``owner_of(user)`` if it needs no call to Redis (the secret is known), else None."""
        secret = self._keyring.known
        return None if secret is None else self._owner(secret, user).hex()

    def lookup(self, token: str) -> tuple[Any, float, str, str | None] | None:
        """``(session, seconds it has left, key hash, owner hash or None)``, or None: a
        miss, which gives this thread a lease on ``token``; raises ``CacheUnavailable``
        (and leaves a void lease)."""
        def build(secret: Secret) -> tuple[list[str], list[Any], str]:
            key = self._hash(secret, token)
            return [self._keys.sessions + key], [], key

        try:
            reply, secret, key = self._run("get", scripts.GET, build)
            if isinstance(reply[1], bytes):
                found = self._decode(secret, reply[1], self._keys.sessions + key, reply[2])
                if found is not None:
                    return (*found[:2], key, found[2])
                # A value that is not ours, or past its deadline: a miss after all, and the
                # script granted no lease for it. Rare (tests' clocks, tampering): a call,
                # whose failure leaves this miss a void lease rather than an error.
                try:
                    reply = self._run("lease", scripts.LEASE, lambda _: ([], [], None))[0]
                except CacheUnavailable:
                    self._leases.grant(token, _VOID)
                    return None
        except CacheUnavailable:
            self._leases.grant(token, _VOID)
            raise
        self._leases.grant(token, (reply[2], reply[3]))
        return None

    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]:
        """Write ``session`` (``ttl`` and ``user``, in ``user_key`` form, already checked)
        and file it under ``user``; returns the key hash and the owner hash used. If this
        thread's lease on ``token`` is void (a logout since its miss), writes nothing,
        deletes the token's entry and raises ``LeaseDropped``."""
        try:
            payload = self._codec.encode(session)
        except TypeError as exc:
            hint = ""
            if self._keyring.shared and isinstance(self._codec, JsonCodec):
                hint = (
                    "; without secret= the default codec is JsonCodec: pass secret= (then "
                    "PickleCodec is the default) or a codec for your sessions"
                )
            raise InvalidType(
                f"{type(self._codec).__name__} cannot encode a {type(session).__name__} "
                f"({exc}){hint}"
            ) from exc
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidType(f"codec.encode returned {type(payload).__name__}, not bytes")
        px = max(1, math.ceil(ttl * 1000))
        deadline = 0  # none: Redis's expiry alone
        if self._clock is not None:
            deadline = min(values.MAX_MS, max(1, round((self._clock() + ttl) * 1000)))
        keys = self._keys
        lease = self._leases.take(token)  # after every check: a refused set keeps it
        if lease is NO_LEASE:
            stamp: list[Any] = [scripts.NO_LEASE, 0]
        elif lease is EXPIRED or lease is _VOID:
            stamp = [scripts.VOID_LEASE, 0]
        else:
            stamp = list(lease)

        def build(secret: Secret) -> tuple[list[str], list[Any], tuple[str, str | None]]:
            key = self._hash(secret, token)
            full = keys.sessions + key
            owner = scripts.NO_OWNER if user is None else self._owner(secret, user)
            value = values.pack(secret, full, deadline, owner, payload)
            index = [] if user is None else [keys.users + owner.hex()]
            args = [value, px, owner, key, keys.users, px + scripts.GRACE_MS, *stamp,
                    keys.channel]
            return [full, *index], args, (key, None if user is None else owner.hex())

        reply, _, stored = self._run("set", scripts.SET, build)
        if reply[1] == scripts.DROPPED:
            self._lease_drops += 1
            raise LeaseDropped(stored[0])
        return stored

    def remove(self, token: str) -> str:
        """Delete ``token``'s entry (and its place in its user's index) and publish its key
        hash; returns the key hash."""
        keys = self._keys

        def build(secret: Secret) -> tuple[list[str], list[Any], str]:
            key = self._hash(secret, token)
            return [keys.sessions + key], [key, keys.users, keys.channel], key

        return self._run("invalidate", scripts.REMOVE, build, wait=True)[2]

    def revoke(self, user: str) -> tuple[int, str]:
        """Delete every session filed under ``user`` (``user_key`` form) and publish the
        owner hash; returns how many live sessions were deleted, and the owner hash."""
        keys = self._keys

        def build(secret: Secret) -> tuple[list[str], list[Any], str]:
            owner = self._owner(secret, user)
            return [keys.users + owner.hex()], [owner, keys.sessions, keys.channel], owner.hex()

        reply, _, owner = self._run("invalidate_by_user", scripts.REVOKE, build, wait=True)
        deadlines = reply[1]
        if self._clock is None:
            return len(deadlines), owner
        # Redis expires on its own clock; with a clock of ours, sessions past their deadline
        # on it were already misses, so they are not counted as dropped.
        now_ms = round(self._clock() * 1000)
        live = 0
        for raw in deadlines:
            deadline = values.deadline_of(raw)
            live += deadline == 0 or now_ms < deadline
        return live, owner

    def add_secret_listener(self, listener: Listener) -> None:
        """Call ``listener()`` whenever this object learns that the shared secret changed
        (every key hash it gave out before is then stale)."""
        self._keyring.add_listener(listener)

    def pubsub(self) -> Any:
        """A PubSub of this cache's client, subscribed to nothing yet; ``CacheUnavailable``
        if the client cannot be made."""
        return self._link.call("subscribe", self._link.pubsub)

    @property
    def channel(self) -> str:
        return self._keys.channel

    @property
    def unavailable_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions a call to the client raises when Redis is unreachable or refuses."""
        return self._link.errors

    def wipe(self) -> None:
        """Delete every session and user index of this prefix, then announce it."""
        self._ensure_open()
        self._link.sweep("clear", self._keys.patterns(), _SCAN_COUNT)
        announce = [self._keys.channel]
        self._run("clear", scripts.CLEARED, lambda secret: ([], announce, None), wait=True)

    # -- helpers -------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise CacheClosed("this RedisSessionCache is closed")

    def _run(
        self,
        op: str,
        script: Script,
        build: Callable[[Secret], tuple[list[str], list[Any], T]],
        *,
        wait: bool = False,
    ) -> tuple[Any, Secret, T]:
        """Run ``script`` with the keys and arguments ``build`` makes from the secret;
        returns the script's reply, the secret, and what ``build`` returned. A shared
        secret that was replaced meanwhile is reloaded and the call made again under it;
        with ``wait`` and ``min_replicas``, fewer acknowledgements raise."""
        self._ensure_open()
        link, keyring = self._link, self._keyring
        replicas = self._min_replicas if wait else 0
        for _ in range(_SECRET_TRIES):
            secret = keyring.current(op)
            keys, args, extra = build(secret)
            reply, acked = link.run(
                op,
                script,
                [self._keys.fingerprint, *keys],
                [*keyring.guard_args(secret), *args],
                wait=replicas,
                wait_ms=max(1, round(self._replica_timeout * 1000)),
            )
            if reply[0] != scripts.OK:
                keyring.refused(secret, reply[1])  # raises, or forgets a replaced secret
                continue
            if acked is not None and acked < replicas:
                raise link.unavailable(
                    f"Redis {op}: {acked} of the {replicas} replicas asked for (min_replicas) "
                    f"acknowledged it within {self._replica_timeout} s; not reported done, "
                    "since a failover now could lose it"
                )
            return reply, secret, extra
        raise link.unavailable(
            f"Redis {op} failed: the secret at {self._keys.secret!r} changed {_SECRET_TRIES} "
            "times during one call (is something deleting it?)"
        )

    def _hash(self, secret: Secret, token: str) -> str:
        mac = secret.key_mac.copy()
        mac.update(_args.token_bytes(token))
        return str(mac.hexdigest())

    def _owner(self, secret: Secret, user: str) -> bytes:
        mac = secret.user_mac.copy()
        mac.update(_args.token_bytes(user))
        return bytes(mac.digest())

    def _decode(
        self, secret: Secret, raw: bytes, full: str, pttl: Any
    ) -> tuple[Any, float, str | None] | None:
        """``(session, seconds left, owner hash or None)``, or None for a miss."""
        unpacked = values.unpack(secret, full, raw)
        if unpacked is None:
            self._decode_errors += 1
            return None
        deadline, owner, payload = unpacked
        # PTTL -1 (no expiry) cannot come from our SET ... PX; the MAC says it is ours, so
        # someone PERSISTed it: trust the deadline, if any.
        left = pttl / 1000 if isinstance(pttl, int) and pttl >= 0 else math.inf
        if self._clock is not None and deadline:
            now = self._clock()
            if round(now * 1000) >= deadline:
                return None
            left = min(left, deadline / 1000 - now)
        try:
            session = self._codec.decode(payload)
        except Exception:  # a codec that cannot read it: a miss, as in the shared table
            self._decode_errors += 1
            return None
        return session, left, None if owner == scripts.NO_OWNER else owner.hex()
