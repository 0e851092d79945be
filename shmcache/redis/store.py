"""The Redis operations one cache is made of: keyed hashes, MAC'd values, one script a call.

``RedisStore`` is what ``TieredSessionCache`` builds on (read with the time left, write and
get the hashes back, delete and publish); ``RedisSessionCache`` (``cache.py``) is the
``SessionCache`` on top of it, with the argument checks, ``fail_open`` and the figures.

Each call is one Lua script (``scripts.py``) on the node that owns the cache's hash slot
(``keys.py`` draws the keys; ``link.py`` sends the scripts, on one Redis, behind Sentinel or
on a cluster); the script first checks the secret's fingerprint (``keyring.py``) and does
nothing if it is not this client's. Values are packed and MAC'd by ``values.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _args
from .._closing import ClosesOnExit
from .._errors import CacheClosed, InvalidType
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


class RedisStore(ClosesOnExit):
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

    def key_of(self, token: str) -> str:
        """The 32-hex-digit keyed hash that stands for ``token`` in Redis and in messages."""
        self._ensure_open()
        return self._hash(self._keyring.current("get"), token)

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
        """``(session, seconds it has left, key hash, owner hash or None)``, or None;
        raises ``CacheUnavailable``."""
        def build(secret: Secret) -> tuple[list[str], list[Any], str]:
            key = self._hash(secret, token)
            return [self._keys.sessions + key], [], key

        reply, secret, key = self._run("get", scripts.GET, build)
        if len(reply) < 3 or not isinstance(reply[1], bytes):
            return None
        found = self._decode(secret, reply[1], self._keys.sessions + key, reply[2])
        return None if found is None else (*found[:2], key, found[2])

    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]:
        """Write ``session`` (``ttl`` and ``user``, in ``user_key`` form, already checked)
        and file it under ``user``; returns the key hash and the owner hash used."""
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

        def build(secret: Secret) -> tuple[list[str], list[Any], tuple[str, str | None]]:
            key = self._hash(secret, token)
            full = keys.sessions + key
            owner = scripts.NO_OWNER if user is None else self._owner(secret, user)
            value = values.pack(secret, full, deadline, owner, payload)
            index = [] if user is None else [keys.users + owner.hex()]
            args = [value, px, owner, key, keys.users, px + scripts.GRACE_MS]
            return [full, *index], args, (key, None if user is None else owner.hex())

        return self._run("set", scripts.SET, build)[2]

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
        self._run("clear", scripts.CLEARED, lambda secret: ([], [self._keys.channel], None),
                  wait=True)

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
