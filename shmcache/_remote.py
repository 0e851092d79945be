"""What a store shared by several hosts offers: the ``SessionCache`` front every remote
backend shares, and the interface ``TieredSessionCache`` needs of its remote tier.

Layer: backends (between the shared vocabulary and ``redis/``, ``sql/``, ``tiered.py``).
It imports only the vocabulary modules; it knows neither Redis nor SQL.

A remote backend implements four primitives, ``lookup`` / ``store`` / ``remove`` /
``revoke``, each raising ``CacheUnavailable`` when the store cannot be reached;
``RemoteSessionCache`` turns them into the protocol's ``get`` / ``set`` / ``invalidate`` /
``invalidate_by_user`` with the same argument checks, fail-open rule and counters on every
backend. ``TieredSessionCache`` calls the primitives directly (it needs the key hashes
they return), which is what ``RemoteTier`` spells out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from . import _args
from ._closing import ClosesOnExit
from ._errors import CacheClosed, CacheUnavailable
from ._protocol import UserIdOf

Listener = Callable[[], None]  # told that the shared secret changed (called outside locks)
Found = tuple[Any, float, str, "str | None"]  # session, seconds left, key hash, owner hash


class LeaseDropped(Exception):
    """Raised by a remote's ``store`` that did not write because this thread's lease on the
    token was void (a logout since its miss, or the lease expired: ``shmcache/_leases.py``);
    the remote has also deleted any entry of the token. ``key`` is the token's key hash.
    Never reaches the caller of ``set``: the backends catch it (a dropped set returns)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"set of key hash {key} not stored: its lease is void")
        self.key = key


@runtime_checkable
class RemoteTier(Protocol):
    """The remote side of ``TieredSessionCache``: ``RedisSessionCache`` and
    ``DatabaseSessionCache`` (PostgreSQL) satisfy it.

    Key and owner hashes are 32 lowercase hex digits; the invalidation channel carries
    ``b"i:<key hash>"``, ``b"u:<owner hash>"`` and ``b"c"``. ``pubsub()`` returns an object
    shaped like redis-py's ``PubSub``: ``subscribe(channel)``, ``get_message(timeout=)``
    returning ``None`` or a dict with ``"type"`` (``"subscribe"``, ``"message"``) and
    ``"data"`` (bytes), and ``close()``; a lost connection raises one of
    ``unavailable_errors``.

    Leases (``shmcache/_leases.py``), in the remote: a ``lookup`` that finds nothing (or
    cannot reach the store) gives the calling thread a lease on the token; the thread's next
    ``store`` of it raises ``LeaseDropped`` instead of writing if a logout of the token, of
    its user, or a clear came since, or the lease expired. ``TieredSessionCache`` then drops
    its local copy too, so the lease holds end to end.
    """

    @property
    def fail_open(self) -> bool: ...

    @property
    def channel(self) -> str: ...

    @property
    def unavailable_errors(self) -> tuple[type[BaseException], ...]: ...

    def key_of(self, token: str) -> str: ...

    def cached_key_of(self, token: str) -> str | None: ...

    def cached_owner_of(self, user: str) -> str | None: ...

    def user_of(self, session: Any, user_id: object) -> str | None: ...

    def lookup(self, token: str) -> Found | None: ...

    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]: ...

    def remove(self, token: str) -> str: ...

    def revoke(self, user: str) -> tuple[int, str]: ...

    def clear(self) -> None: ...

    def pubsub(self) -> Any: ...

    def add_secret_listener(self, listener: Listener) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class RemoteSessionCache(ClosesOnExit, ABC):
    """The ``SessionCache`` front of a remote backend, on top of its primitives.

    Subclasses set ``_fail_open``, ``_user_id_of`` and ``_closed`` and implement
    ``lookup``, ``store``, ``remove`` and ``revoke`` (see ``RemoteTier``).

    ``fail_open=False``: a store that cannot be reached raises ``CacheUnavailable``.
    ``fail_open=True``: ``get`` counts it and returns a miss, ``set`` counts it and stores
    nothing. ``invalidate`` and ``invalidate_by_user`` raise in both modes: a logout that
    did not reach the store is never reported as done.
    """

    _fail_open: bool = False
    _user_id_of: UserIdOf | None = None
    _hits: int = 0
    _misses: int = 0
    _what = "cache"  # for messages: "this DatabaseSessionCache is closed"

    # -- the SessionCache protocol -------------------------------------------------------

    def get(self, token: str) -> Any | None:
        """The session cached for ``token``, or None; never raises because of what the
        store holds (a foreign, damaged or undecodable value is a miss)."""
        _args.check_token(token)
        self._ensure_open()
        try:
            found = self.lookup(token) if token else None
        except CacheUnavailable:
            if not self._fail_open:
                raise
            found = None
        if found is None:
            self._misses += 1
            return None
        self._hits += 1
        return found[0]

    def set(
        self, token: str, session: Any, ttl_seconds: float, *, user_id: str | int | None = None
    ) -> None:
        """Cache ``session`` for ``ttl_seconds`` (millisecond precision), filed under
        ``user_id`` (or ``user_id_of(session)``) if there is one. Re-setting a token files
        it under its new user only."""
        ttl = _args.check_set_args(token, ttl_seconds)
        user = self.user_of(session, user_id)
        self._ensure_open()
        try:
            self.store(token, session, ttl, user)
        except LeaseDropped:
            pass  # counted by store(); the racing request may still use its session
        except CacheUnavailable:
            if not self._fail_open:
                raise

    def invalidate(self, token: str) -> None:
        """Delete ``token`` and announce it; raises ``CacheUnavailable`` rather than
        return without having deleted it (whatever ``fail_open`` says)."""
        _args.check_token(token)
        self._ensure_open()
        if token:
            self.remove(token)

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Delete every session of ``user_id`` (compared by ``str()``) and announce it;
        returns how many live sessions were deleted. Raises ``CacheUnavailable`` rather
        than return without the store having deleted them (whatever ``fail_open`` says)."""
        user = _args.user_key(user_id)
        self._ensure_open()
        return self.revoke(user)[0]

    # -- primitives (subclasses) ---------------------------------------------------------

    @abstractmethod
    def lookup(self, token: str) -> Found | None:
        ...

    @abstractmethod
    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]:
        ...

    @abstractmethod
    def remove(self, token: str) -> str:
        ...

    @abstractmethod
    def revoke(self, user: str) -> tuple[int, str]:
        ...

    # -- shared helpers ------------------------------------------------------------------

    def user_of(self, session: Any, user_id: object) -> str | None:
        """The user a ``set`` files ``session`` under (``user_key`` form): ``user_id`` if
        given, else ``user_id_of(session)``; ``InvalidType``/``InvalidArgument`` if bad."""
        if user_id is None and self._user_id_of is not None:
            user_id = self._user_id_of(session)
        return None if user_id is None else _args.user_key(user_id)

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    def _ensure_open(self) -> None:
        if self._closed:
            raise CacheClosed(f"this {self._what} is closed")
