"""``DatabaseSessionCache``: the ``SessionCache`` protocol on a SQL table (SQLite or
PostgreSQL), the seed's third backend.

Layer: backends. Tokens, user ids, the secret, sessions and the codec live here; the SQL
lives in the stores (``sqlite.py``, ``postgres.py``), which move opaque bytes, and the
row format (keyed hashes, sealed values) in ``values.py``.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _args
from .._errors import CacheUnavailable, InvalidArgument, InvalidType, SecretMismatch
from .._leases import DEFAULT_TIMEOUT as DEFAULT_LEASE_TIMEOUT
from .._leases import EXPIRED, NO_LEASE, Leases
from .._protocol import UserIdOf
from .._remote import Found, LeaseDropped, Listener, RemoteSessionCache
from ..codecs import Codec, JsonCodec, PickleCodec
from .store import StaleFingerprint
from .upkeep import RECLAIM_EVERY as RECLAIM_EVERY  # (tests count sets by it)
from .upkeep import DatabaseUpkeep
from .urls import make_store
from .values import Secret, derive, fingerprint, keyed, open_value, seal

Clock = Callable[[], float]
T = TypeVar("T")

_SECRET_TRIES = 3  # the meta row replaced twice during one call: someone keeps deleting it


class DatabaseSessionCache(RemoteSessionCache, DatabaseUpkeep):
    """A ``SessionCache`` on a SQL table that every process (SQLite: of one host;
    PostgreSQL: of every host) shares: a logout in one is a miss in all, at once.

    ``DatabaseSessionCache("sqlite:////var/lib/myapp/sessions.db")``,
    ``DatabaseSessionCache("postgresql://user:pw@host:5432/db")`` (also ``postgres://``),
    or ``DatabaseSessionCache(connect=make_connection, dialect="postgresql")`` with a
    callable returning a new psycopg 3 connection (or, for ``dialect="sqlite"``, a
    ``sqlite3`` connection made with ``check_same_thread=False``: threads take turns on
    them), called once per connection this process needs.

    Options: ``table`` (``shmcache_sessions``; made if missing, with ``{table}_meta`` and
    ``{table}_stamps``), ``timeout`` (1 s: SQLite's busy timeout; PostgreSQL's connect,
    pool and statement timeout), ``unlogged`` (PostgreSQL: an UNLOGGED table, emptied by a
    crash; ignored by SQLite), ``user_id_of``, ``lease_timeout`` (below), ``clock`` (tests:
    the expiry and lease clock instead of the database's and ``time.monotonic``).

    Leases (a racing validation never undoes a logout): a ``get`` that misses takes, for
    its thread, a lease on the token; that thread's next ``set`` of the token is not stored
    (and any row of the token is deleted) if an ``invalidate`` of it, an
    ``invalidate_by_user`` of the set's user, or a ``clear`` was committed after the miss,
    in any process, or if the miss is ``lease_timeout`` (10 s) old, or if the database did
    not answer that get (``fail_open``). A ``set`` with no miss before it is stored as
    always. Refused sets are counted in ``stats()["lease_drops"]`` (table-wide) and
    ``["process_lease_drops"]``; ``store.py`` and ``pg_leases.py`` say how.

    The secret of the keyed hashes: ``secret=None`` (default) keeps a random one in
    ``{table}_meta``, made by the first client; whoever can read the table can then check
    a guessed token and forge values, so the default codec is ``JsonCodec`` and
    ``PickleCodec`` is refused. ``secret=b"..."`` (at least 16 bytes, the same on every
    host) stores only its fingerprint: the database alone reveals nothing, values written
    without it are refused, and the default codec is ``PickleCodec``. A client whose
    secret does not match the table's raises ``SecretMismatch`` at its first call.

    Failures (unreachable, locked past ``timeout``): ``fail_open=False`` raises
    ``CacheUnavailable``; ``fail_open=True`` makes ``get`` a miss and ``set`` a no-op
    (both counted in ``stats()["unavailable"]``). ``invalidate``, ``invalidate_by_user``
    and ``clear`` always raise: a logout is never reported done when it was not.
    """

    _what = "DatabaseSessionCache"

    def __init__(
        self,
        url: str | None = None,
        *,
        connect: Callable[[], Any] | None = None,
        dialect: str | None = None,
        table: str = "shmcache_sessions",
        secret: bytes | str | None = None,
        codec: Codec | None = None,
        user_id_of: UserIdOf | None = None,
        timeout: float = 1.0,
        fail_open: bool = False,
        unlogged: bool = True,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        clock: Clock | None = None,
    ) -> None:
        for name, flag in (("fail_open", fail_open), ("unlogged", unlogged)):
            if not isinstance(flag, bool):
                raise InvalidArgument(f"{name} must be True or False, got {flag!r}")
        for name, fn in (("user_id_of", user_id_of), ("clock", clock)):
            if fn is not None and not callable(fn):
                raise InvalidType(f"{name} must be callable, got {type(fn).__name__}")
        if secret is None:
            self._fixed: Secret | None = None
        else:
            raw = secret.encode() if isinstance(secret, str) else secret
            if not isinstance(raw, bytes) or len(raw) < 16:
                raise InvalidArgument("secret must be bytes or str of at least 16 bytes")
            self._fixed = derive(raw, shared=False)
        if codec is None:
            codec = JsonCodec() if secret is None else PickleCodec()
        elif not (callable(getattr(codec, "encode", None))
                  and callable(getattr(codec, "decode", None))):
            raise InvalidType(f"codec must have encode and decode, got {type(codec).__name__}")
        elif secret is None and isinstance(codec, PickleCodec):
            raise InvalidArgument(
                "PickleCodec needs secret=: without it the hashing secret is kept in the "
                "database, and anyone who can read and write the table could make get() "
                "unpickle bytes of their choosing. Pass secret= (the same on every host) "
                "or use JsonCodec"
            )
        timeout = _args.positive_number("timeout", timeout)
        lease_timeout = _args.positive_number("lease_timeout", lease_timeout)
        self._store = make_store(url, connect, dialect, table, timeout, unlogged)
        self._codec: Codec = codec
        self._fail_open = fail_open
        self._user_id_of = user_id_of
        self._clock = clock
        self._active: tuple[Secret, bytes] | None = None  # the secret in use, its fingerprint
        self._secret_lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._closed = False
        self._unavailable = 0
        self._decode_errors = 0
        self._sets = 0
        self._reclaimed = 0
        self._leases = Leases(lease_timeout, clock)
        self._lease_timeout = lease_timeout
        self._stamp_age_ms = math.ceil(lease_timeout * 1000)
        self._lease_drops = 0  # this object's sets that a lease refused

    # -- the pieces TieredSessionCache builds on (see shmcache._remote.RemoteTier) --------

    def lookup(self, token: str) -> Found | None:
        """``(session, seconds it has left, key hash, owner hash or None)``, or None (and
        this thread takes a lease on ``token``); raises ``CacheUnavailable``."""
        def run(secret: Secret, fp: bytes) -> tuple[bytes, Any, Any, Secret]:
            key = keyed(secret.key_mac, token)
            row, stamp = self._store.lookup(key, fp, self._now())
            return key, row, stamp, secret

        try:
            key, row, stamp, secret = self._run("get", run)
        except CacheUnavailable:
            self._leases.grant(token, EXPIRED)  # a miss all the same: its set is dropped
            raise
        if row is not None:
            value, owner, left_ms = row
            session = self._decode(secret, key, owner, value)
            if session is not None:
                return session[0], left_ms / 1000, key.hex(), None if owner is None else owner.hex()
        if stamp is None:
            # The stamps were lost (a crash emptied them): this lease cannot be vouched
            # for; make them again so that the next ones can.
            self._leases.grant(token, EXPIRED)
            with contextlib.suppress(CacheUnavailable):
                self._call("get", self._store.restart_stamps)
        else:
            self._leases.grant(token, stamp)
        return None

    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]:
        """Write ``session`` (``ttl`` and ``user``, in ``user_key`` form, already checked);
        returns the key hash and the owner hash used."""
        try:
            payload = self._codec.encode(session)
        except (TypeError, ValueError) as exc:
            raise InvalidType(
                f"{type(self._codec).__name__} cannot encode a {type(session).__name__}: "
                f"{exc}"
            ) from exc
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidType(f"codec.encode returned {type(payload).__name__}, not bytes")
        payload = bytes(payload)
        ttl_ms = max(1, math.ceil(ttl * 1000))
        lease = self._leases.take(token)

        def run(secret: Secret, fp: bytes) -> tuple[bytes, bytes | None, bool]:
            key = keyed(secret.key_mac, token)
            owner = None if user is None else keyed(secret.user_mac, user)
            if lease is EXPIRED:  # not stored, nor any older copy: see shmcache/_leases.py
                self._store.drop(key, fp)
                return key, owner, False
            value = seal(secret, self._store.table, key, owner, payload)
            stored = self._store.store(
                key, owner, value, ttl_ms, fp, self._now(),
                None if lease is NO_LEASE else lease,
            )
            return key, owner, stored

        key, owner, stored = self._run("set", run)
        self._sets += 1
        if self._sets % RECLAIM_EVERY == 0:
            self._reclaim()
        if not stored:
            # The RemoteTier contract: the tier in front (TieredSessionCache) drops its own
            # copy too, so the lease holds end to end.
            self._lease_drops += 1
            raise LeaseDropped(key.hex())
        return key.hex(), None if owner is None else owner.hex()

    def remove(self, token: str) -> str:
        """Delete ``token``'s row and announce its key hash (PostgreSQL: NOTIFY, in the
        same transaction); returns the key hash."""
        def run(secret: Secret, fp: bytes) -> bytes:
            key = keyed(secret.key_mac, token)
            self._store.remove(key, fp, "i:" + key.hex())
            return key

        return self._run("invalidate", run).hex()

    def revoke(self, user: str) -> tuple[int, str]:
        """Delete every row of ``user`` (``user_key`` form) and announce the owner hash,
        in one statement (SQLite: one write transaction); returns how many were live
        and the owner hash. A ``set`` commits wholly before it (and is deleted) or after
        it: none escapes."""
        def run(secret: Secret, fp: bytes) -> tuple[int, bytes]:
            owner = keyed(secret.user_mac, user)
            return self._store.revoke(owner, fp, self._now(), "u:" + owner.hex()), owner

        count, owner = self._run("invalidate_by_user", run)
        return count, owner.hex()

    def clear(self) -> None:
        """Delete every session of this table (other tables and the secret stay) and
        announce it; raises ``CacheUnavailable`` if the database cannot be reached."""
        self._ensure_open()
        self._run("clear", lambda secret, fp: self._store.clear(fp, "c"))

    def key_of(self, token: str) -> str:
        """The 32-hex-digit keyed hash that stands for ``token`` in the table and in
        invalidation messages. It starts a ``get`` of ``TieredSessionCache``: if the
        database cannot be asked for the secret, that get is a miss that knows nothing of
        logouts, so this thread's lease on ``token`` is void (as in ``get``)."""
        self._ensure_open()
        try:
            return keyed(self._current("get")[0].key_mac, token).hex()
        except CacheUnavailable:
            self._leases.grant(token, EXPIRED)
            raise

    def cached_key_of(self, token: str) -> str | None:
        secret = self._known_secret()
        return None if secret is None else keyed(secret.key_mac, token).hex()

    def cached_owner_of(self, user: str) -> str | None:
        secret = self._known_secret()
        return None if secret is None else keyed(secret.user_mac, user).hex()

    def add_secret_listener(self, listener: Listener) -> None:
        """Call ``listener()`` whenever the shared secret may have changed. SQLite refuses:
        it has no invalidation channel for a tier in front of it."""
        if self._store.dialect != "postgresql":
            self._store.listen()  # raises, saying what to use instead
        self._listeners.append(listener)

    def pubsub(self) -> Any:
        """A subscription to the invalidation channel (PostgreSQL: LISTEN, on a
        connection of its own)."""
        return self._store.listen()

    @property
    def channel(self) -> str:
        return self._store.channel

    @property
    def unavailable_errors(self) -> tuple[type[BaseException], ...]:
        return self._store.errors

    def close(self) -> None:
        """Close this process's connections (and the pool); later calls raise
        ``CacheClosed``."""
        if self._closed:
            return
        self._closed = True
        self._store.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._store.describe()} table={self.table!r}"
        return f"<DatabaseSessionCache {state}>"

    @property
    def table(self) -> str:
        return self._store.table

    @property
    def dialect(self) -> str:
        return self._store.dialect

    # -- helpers -------------------------------------------------------------------------

    def _now(self) -> int | None:
        clock = self._clock
        return None if clock is None else round(clock() * 1000)

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """``fn()`` (store calls); a database failure is ``CacheUnavailable``."""
        try:
            return fn()
        except self._store.errors as exc:
            self._unavailable += 1
            detail = " ".join(str(exc).split())  # libpq's messages span lines
            raise CacheUnavailable(
                f"{self._store.dialect} {op} failed: {type(exc).__name__}: {detail}"
            ) from exc

    def _run(self, op: str, fn: Callable[[Secret, bytes], T]) -> T:
        """``fn(secret, fingerprint)``, again under the table's current secret if the
        meta row no longer holds the one ``fn`` hashed with."""
        self._ensure_open()
        for _ in range(_SECRET_TRIES):
            secret, fp = self._current(op)
            def attempt(s: Secret = secret, f: bytes = fp) -> T:
                return fn(s, f)

            try:
                return self._call(op, attempt)
            except StaleFingerprint:
                self._forget(secret)
        self._unavailable += 1
        raise CacheUnavailable(
            f"{self._store.dialect} {op} failed: {self._store.meta} changed "
            f"{_SECRET_TRIES} times during one call (is something deleting it?)"
        )

    def _current(self, op: str) -> tuple[Secret, bytes]:
        active = self._active
        if active is not None:
            return active
        with self._secret_lock:
            if self._active is None:
                self._active = self._call(op, self._load_secret)
            return self._active

    def _load_secret(self) -> tuple[Secret, bytes]:
        store = self._store
        row = store.read_meta()
        if self._fixed is not None:
            mine = fingerprint(self._fixed.raw)
            if row is None:
                row = store.create_meta(None, mine)
            if row[1] != mine:
                raise SecretMismatch(
                    f"secret= is not the secret table {store.table!r} is used with (its "
                    f"{store.meta} row holds another fingerprint): every host must be given "
                    "the same secret, or none"
                )
            return self._fixed, mine
        if row is None:
            fresh = secrets.token_bytes(32)
            row = store.create_meta(fresh, fingerprint(fresh))
        raw, fp = row
        if raw is None:
            raise SecretMismatch(
                f"table {store.table!r} is used with a secret given to each client "
                "(secret=), and this client was given none"
            )
        if fingerprint(raw) != fp:
            raise CacheUnavailable(f"{store.meta}: the stored secret does not match its "
                                   "fingerprint (the row was damaged)")
        return derive(raw, shared=True), fp

    def _known_secret(self) -> Secret | None:
        active = self._active
        return active[0] if active is not None else self._fixed

    def _forget(self, stale: Secret) -> None:
        with self._secret_lock:
            if self._active is not None and self._active[0] is stale:
                self._active = None
        if self._fixed is None:
            # The shared secret may be a new one: every key hash handed out is then stale.
            for listener in list(self._listeners):
                listener()

    def _decode(
        self, secret: Secret, key: bytes, owner: bytes | None, value: bytes
    ) -> tuple[Any] | None:
        payload = open_value(secret, self._store.table, key, owner, value)
        if payload is None:
            self._decode_errors += 1
            return None
        try:
            return (self._codec.decode(payload),)
        except Exception:  # a codec that cannot read it: a miss, as in the shared table
            self._decode_errors += 1
            return None
