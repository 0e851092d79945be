"""Which secret a ``RedisSessionCache`` hashes with, and the check that all hosts share it.

Two modes (``RedisSessionCache`` explains when to use which):

* fixed: the caller's ``secret=``. Its fingerprint (``fixed:`` + a keyed hash) is written
  beside the keys at first use, and written again if it disappears (``FLUSHDB``);
* shared: no ``secret=``; a random secret that the first host creates in Redis with its
  fingerprint (``shared:`` + ...), and every other host reads. A lost or half-lost pair is
  replaced once, announced, and noticed by every host at its next call.

Every script checks the stored fingerprint first (``scripts.guard``) and does nothing if it
is not the caller's: a shared-mode host then reloads the secret and runs the call again; a
fingerprint of another secret is ``SecretMismatch``, never a silent split where a logout on
one host misses the keys of another.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import NoReturn

from .._errors import CacheUnavailable, InvalidArgument, SecretMismatch
from . import scripts
from .keys import Keys
from .link import Link
from .secret import FIXED, SHARED, Secret, derive

_FOREIGN = "FOREIGN"  # the code of the CacheUnavailable raised for a key that is not ours
Listener = Callable[[], None]  # told that the shared secret changed (called outside locks)


class Keyring:
    def __init__(
        self, link: Link, keys: Keys, secret: bytes | str | None, lease_ms: int
    ) -> None:
        if secret is None:
            self._fixed: Secret | None = None
        else:
            raw = secret.encode() if isinstance(secret, str) else secret
            if not isinstance(raw, bytes) or len(raw) < 16:
                raise InvalidArgument("secret must be bytes or str of at least 16 bytes")
            self._fixed = derive(raw, shared=False)
        self._secret: Secret | None = self._fixed
        self._link = link
        self._keys = keys
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._lease_ms = str(lease_ms)

    @property
    def shared(self) -> bool:
        return self._fixed is None

    @property
    def known(self) -> Secret | None:
        """The secret, if it is known without asking Redis."""
        return self._secret

    def guard_args(self, secret: Secret) -> list[str]:
        """ARGV[1..3] of every script (see ``scripts``)."""
        return [secret.fingerprint, "0" if self.shared else "1", self._lease_ms]

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def check(self) -> None:
        """At construction: write or compare the fingerprint now, so that a host with
        another secret (``SecretMismatch``) or a prefix that another program uses
        (``CacheUnavailable``) fails at start, and a replica is refused. A Redis that
        cannot be reached (or is busy) postpones the check to the first call: the app may
        start while Redis is down."""
        try:
            secret = self.current("check")
            reply, _ = self._link.run(
                "check", scripts.CHECK, [self._keys.fingerprint], self.guard_args(secret)
            )
            if reply[0] != scripts.OK:
                self.refused(secret, reply[1])  # a shared secret replaced: checked later
        except CacheUnavailable as exc:
            if exc.code == "READONLY":
                raise InvalidArgument(
                    "the client's server is a read-only replica; a cache writes on every "
                    "logout: give it the primary (with Sentinel, master_for)"
                ) from None
            if exc.code == _FOREIGN:
                raise

    def current(self, op: str) -> Secret:
        """The secret to hash with: the fixed one, or the shared one (read or created)."""
        secret = self._secret
        if secret is not None:
            return secret
        fresh = derive(secrets.token_bytes(32), shared=True)
        keys = self._keys
        reply, _ = self._link.run(
            op,
            scripts.LOAD,
            [keys.fingerprint, keys.secret],
            [fresh.fingerprint, "0", self._lease_ms, fresh.raw, keys.channel],
        )
        if reply[0] == scripts.REFUSED:
            self.refused(fresh, reply[1])
            self._foreign(keys.fingerprint)  # a shared fingerprint LOAD would have taken
        raw = reply[1]
        loaded = fresh if raw == fresh.raw else derive(raw, shared=True)
        if loaded.fingerprint.encode() != reply[2]:
            self._foreign(keys.secret)
        with self._lock:
            if self._secret is None or self._secret.raw != loaded.raw:
                self._secret = loaded
            return self._secret

    def refused(self, secret: Secret, stored: bytes | None) -> None:
        """A script found ``stored`` where ``secret``'s fingerprint should be. Raises, or (a
        shared secret that was replaced or lost) forgets ``secret`` so the call runs again."""
        if stored == scripts.FOREIGN:
            self._foreign(self._keys.fingerprint)
        if self.shared and (stored is None or stored.startswith(SHARED.encode())):
            with self._lock:
                if self._secret is secret:
                    self._secret = None
            for listener in list(self._listeners):
                listener()
            return
        theirs = "a secret= of their own" if stored and stored.startswith(FIXED.encode()) else (
            "the secret kept in Redis (no secret=)"
        )
        ours = "this one's secret=" if not self.shared else "no secret= here"
        raise SecretMismatch(
            f"Redis prefix {self._keys.prefix!r} is in use with another secret (hosts there "
            f"use {theirs}; {ours}): every host that shares a prefix must pass the same "
            "secret=, or all none"
        )

    def _foreign(self, key: str) -> NoReturn:
        raise self._link.unavailable(
            f"Redis key {key!r} does not hold a shmcache secret or fingerprint: does another "
            f"program use the prefix {self._keys.prefix!r}?",
            _FOREIGN,
        )
