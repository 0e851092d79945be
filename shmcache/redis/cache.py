"""``RedisSessionCache``: the ``SessionCache`` protocol on a Redis server that hosts share.

The shared-memory table ends at the host; when several hosts serve one app, a logout must
reach all of them, and Redis is the usual meeting point. redis-py is an optional extra
(``pip install 'shmcache[redis]'``): it is imported when a Redis cache is made, so
``import shmcache`` works without it.

Keys under ``prefix`` (default ``"shmcache:"``)::

    {prefix}secret         the hashing secret every host shares (absent if ``secret=`` is given)
    {prefix}s:<32 hex>     one session: keyed BLAKE2b-128 of the token, with a PX expiry
    {prefix}u:<32 hex>     one user's sessions: keyed BLAKE2b-128 of ``str(user_id)``; a
                           sorted set of session key hashes scored by expiry (ms, Redis
                           TIME), expiring with its longest-lived session
    {prefix}invalidations  pub/sub channel: b"i:<32 hex>" after an invalidate, b"u:<32 hex>"
                           (the user's hash) after an invalidate_by_user, b"c" after a clear
                           (``TieredSessionCache`` drops its local copies on them)

A value is ``version (1 byte, 2) | deadline (int64 LE, ms on the writer's clock, 0: none) |
owner (16 bytes: the user's hash, zeros: none) | MAC (16 bytes) | codec bytes``. The MAC is
a keyed BLAKE2b of the key and the rest, so a value moved to another token's key or user,
truncated, or written by a program that does not hold the secret is a miss
(``stats()["decode_errors"]``), never somebody else's session. Version 1 (no owner) values
are misses too. The per-user index is kept by the Lua scripts in ``scripts.py``.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .. import _args
from .._closing import ClosesOnExit
from .._errors import CacheClosed, CacheUnavailable, InvalidArgument, InvalidType
from .._protocol import UserIdOf
from ..codecs import Codec, PickleCodec
from . import scripts
from .client import check_client, client_from_url, import_redis
from .secret import MAC_SIZE, Secret, derive, mac

Clock = Callable[[], float]
T = TypeVar("T")

_VERSION = scripts.VERSION
_HEAD = struct.Struct("<Bq16s")  # version, deadline ms, owner (see scripts.py)
_VALUE_START = _HEAD.size + MAC_SIZE
_DEADLINE = struct.Struct("<q")
_MAX_MS = (1 << 63) - 1
_SECRET_TRIES = 3  # a secret replaced twice during one call means someone keeps deleting it
_SCAN_COUNT = 1000
_DEFAULT_TIMEOUT = 1.0  # seconds; redis-py's own default is to wait forever
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")

Listener = Callable[[], None]  # told that the shared secret changed (called outside locks)


class RedisSessionCache(ClosesOnExit):
    """A ``SessionCache`` on a Redis server: a logout on one host is a miss on every host.

    ``client`` is a redis-py client (``decode_responses=False``; give it a ``socket_timeout``,
    or a stalled server stalls your requests) or a URL (``redis://host:6379/0``,
    ``rediss://...``, ``unix:///path/redis.sock``), from which a client is made with
    ``timeout`` (default 1 s) as its socket and connect timeouts and one retry.

    Tokens never reach Redis: keys are keyed hashes of them. The secret of that hash is
    shared by every host in one of two ways:

    * ``secret=None`` (default): a random 32-byte secret that the first process creates in
      Redis (``SET {prefix}secret NX``) and all others read. Nothing to configure, and
      Redis dumps, replicas, ``MONITOR`` and slow logs hold no token. But whoever can read
      Redis can read the secret too: they cannot recover a token from a key, but they can
      check a guessed one, and forge values (use ``JsonCodec``, not pickle, if that
      matters). Every call also re-reads the secret in the same transaction, so a secret
      that disappears (``FLUSHDB``, an ``allkeys-*`` eviction policy) is replaced once and
      noticed by every host at its next call: hosts never split into two key spaces, where
      a logout on one would not reach the other. A process must reach Redis once before it
      can hash a token.
    * ``secret=b"..."`` (from your secret store, the same on every host): Redis alone
      reveals nothing, values written without the secret are refused (so pickle is safe
      even if Redis is not), and no secret is read per call. Hosts with different secrets
      under one prefix do not see each other's logouts: treat it like a database password.

    ``fail_open=False`` (default): a Redis that cannot be reached or refuses a command
    raises ``CacheUnavailable`` (a ``ConnectionError``). ``fail_open=True``: ``get`` counts
    it (``stats()["unavailable"]``) and returns a miss, so the app validates the token
    against its database; ``set`` counts it and stores nothing (a session set before the
    outage stays until its TTL ends). ``invalidate`` and ``clear`` raise in both modes.

    ``clock`` is for tests: if given, each value also carries its deadline on that clock and
    is a miss from then on (Redis's own expiry still applies). All hosts would have to
    share it, so the default is Redis's expiry alone.

    ``set(..., user_id=)`` (or ``user_id_of(session)``, if given, when ``user_id`` is not)
    files the session under its user, so that ``invalidate_by_user`` on any host drops all
    of that user's sessions at once. User ids reach Redis only as keyed hashes, like tokens.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "shmcache:",
        codec: Codec | None = None,
        secret: bytes | str | None = None,
        fail_open: bool = False,
        timeout: float | None = None,
        clock: Clock | None = None,
        user_id_of: UserIdOf | None = None,
    ) -> None:
        redis = import_redis()
        if user_id_of is not None and not callable(user_id_of):
            raise InvalidType(f"user_id_of must be callable, got {type(user_id_of).__name__}")
        if not isinstance(prefix, str) or not prefix:
            raise InvalidArgument(f"prefix must be a non-empty str, got {prefix!r}")
        if not isinstance(fail_open, bool):
            raise InvalidArgument(f"fail_open must be True or False, got {fail_open!r}")
        if isinstance(client, str):
            self._client = client_from_url(
                redis, client, _DEFAULT_TIMEOUT if timeout is None else timeout
            )
            self._owns_client = True
        else:
            if timeout is not None:
                raise InvalidArgument(
                    "timeout applies to a client made from a URL; set socket_timeout on the "
                    "client you pass instead"
                )
            check_client(client)
            self._client = client
            self._owns_client = False
        if secret is None:
            self._fixed: Secret | None = None
        else:
            raw = secret.encode() if isinstance(secret, str) else secret
            if not isinstance(raw, bytes) or len(raw) < 16:
                raise InvalidArgument("secret must be bytes or str of at least 16 bytes")
            self._fixed = derive(raw)
        self._secret: Secret | None = self._fixed
        self._prefix = prefix
        self._secret_key = prefix + "secret"
        self._channel = prefix + "invalidations"
        self._codec: Codec = codec if codec is not None else PickleCodec()
        self._fail_open = fail_open
        self._clock = clock
        self._user_id_of = user_id_of
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._no_script: type[BaseException] = redis.exceptions.NoScriptError
        self._listeners: list[Listener] = []
        self._secret_lock = threading.Lock()
        self._closed = False
        self._hits = 0
        self._misses = 0
        self._unavailable = 0
        self._decode_errors = 0

    # -- the SessionCache protocol -------------------------------------------------------

    def get(self, token: str) -> Any | None:
        """The session cached for ``token``, or None; never raises because of what Redis
        holds (a foreign, damaged or undecodable value is a miss)."""
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
        """Cache ``session`` for ``ttl_seconds`` (a Redis expiry, millisecond precision),
        filed under ``user_id`` (or ``user_id_of(session)``) if there is one. Re-setting a
        token files it under its new user only."""
        ttl = _args.check_set_args(token, ttl_seconds)
        user = self.user_of(session, user_id)
        self._ensure_open()
        try:
            self.store(token, session, ttl, user)
        except CacheUnavailable:
            if not self._fail_open:
                raise

    def invalidate(self, token: str) -> None:
        """Delete ``token`` in Redis and announce it; raises ``CacheUnavailable`` rather
        than return without having deleted it (whatever ``fail_open`` says)."""
        _args.check_token(token)
        self._ensure_open()
        if token:
            self.remove(token)

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Delete every session of ``user_id`` (compared by ``str()``) and announce it;
        returns how many live sessions were deleted. Raises ``CacheUnavailable`` rather
        than return without Redis having deleted them (whatever ``fail_open`` says).

        After it returns, no session of that user that was set before it was called is
        left, and none set while it ran escapes a later call: the ``set`` script writes a
        session and its index entry as one command, and the revoke script reads the index,
        deletes each member that still belongs to the user, and deletes the index, as one
        command. A ``set`` runs wholly before it (its session is in the index and deleted)
        or wholly after it (it starts a new index that the next revoke finds). Cost: one
        command that holds Redis for its duration, O(sessions in the user's index): a
        read of each session's 25-byte header and a delete (a few microseconds each).
        """
        user = _args.user_key(user_id)
        self._ensure_open()
        return self.revoke(user)[0]

    def clear(self) -> None:
        """Delete every session (and user index) under this prefix (SCAN + UNLINK, never
        FLUSHDB: other data in the database stays), then announce it. O(keys in the
        database); raises ``CacheUnavailable`` if Redis cannot be reached."""
        self._ensure_open()
        escaped = _GLOB_SPECIALS.sub(r"\\\1", self._prefix)
        client = self._client

        def sweep() -> None:
            for pattern in (escaped + "s:*", escaped + "u:*"):
                cursor = 0
                while True:
                    cursor, keys = client.scan(cursor, match=pattern, count=_SCAN_COUNT)
                    if keys:
                        client.unlink(*keys)
                    if not cursor:
                        break

        self._call("clear", sweep)
        self._call("clear", lambda: client.publish(self._channel, b"c"))

    # -- the pieces TieredSessionCache builds on ----------------------------------------

    def key_of(self, token: str) -> str:
        """The 32-hex-digit keyed hash that stands for ``token`` in Redis and in messages."""
        self._ensure_open()
        return self._hash(self._current_secret("get"), token)

    def cached_key_of(self, token: str) -> str | None:
        """``key_of(token)`` if it needs no call to Redis (the secret is known), else None."""
        secret = self._secret
        return None if secret is None else self._hash(secret, token)

    def owner_of(self, user: str) -> str:
        """The 32-hex-digit keyed hash that stands for a user (``user_key`` form) in Redis
        and in messages."""
        self._ensure_open()
        return self._owner(self._current_secret("get"), user).hex()

    def cached_owner_of(self, user: str) -> str | None:
        """``owner_of(user)`` if it needs no call to Redis (the secret is known), else None."""
        secret = self._secret
        return None if secret is None else self._owner(secret, user).hex()

    def user_of(self, session: Any, user_id: object) -> str | None:
        """The user a ``set`` files ``session`` under (``user_key`` form): ``user_id`` if
        given, else ``user_id_of(session)``; ``InvalidType``/``InvalidArgument`` if bad."""
        if user_id is None and self._user_id_of is not None:
            user_id = self._user_id_of(session)
        return None if user_id is None else _args.user_key(user_id)

    def lookup(self, token: str) -> tuple[Any, float, str, str | None] | None:
        """``(session, seconds it has left, key hash, owner hash or None)``, or None;
        raises ``CacheUnavailable``."""
        def queue(pipe: Any, secret: Secret) -> str:
            key = self._hash(secret, token)
            full = self._prefix + "s:" + key
            pipe.get(full)
            pipe.pttl(full)
            return key

        (raw, pttl), key, secret = self._transact("get", queue)
        if not isinstance(raw, bytes):
            return None  # absent, or an error such as WRONGTYPE: a miss, not our business
        found = self._decode(secret, raw, self._prefix + "s:" + key, pttl)
        return None if found is None else (*found[:2], key, found[2])

    def store(
        self, token: str, session: Any, ttl: float, user: str | None = None
    ) -> tuple[str, str | None]:
        """Write ``session`` (``ttl`` and ``user``, in ``user_key`` form, already checked)
        and file it under ``user``; returns the key hash and the owner hash used."""
        payload = self._codec.encode(session)
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidType(f"codec.encode returned {type(payload).__name__}, not bytes")
        px = max(1, math.ceil(ttl * 1000))
        deadline = 0  # none: Redis's expiry alone
        if self._clock is not None:
            deadline = min(_MAX_MS, max(1, round((self._clock() + ttl) * 1000)))
        users = self._prefix + "u:"

        def queue(pipe: Any, secret: Secret) -> tuple[str, str | None]:
            key = self._hash(secret, token)
            full = self._prefix + "s:" + key
            owner = scripts.NO_OWNER if user is None else self._owner(secret, user)
            head = _HEAD.pack(_VERSION, deadline, owner)
            value = head + mac(secret, full, head, payload) + bytes(payload)
            keys = [full] if user is None else [full, users + owner.hex()]
            index_px = px + scripts.GRACE_MS
            self._script(pipe, scripts.SET, keys, value, px, owner, key, users, index_px)
            return key, None if user is None else owner.hex()

        results, (key, owner), _ = self._transact("set", queue)
        _raise_errors("set", results)
        return key, owner

    def remove(self, token: str) -> str:
        """Delete ``token``'s entry (and its place in its user's index) and publish its key
        hash; returns the key hash."""
        def queue(pipe: Any, secret: Secret) -> str:
            key = self._hash(secret, token)
            self._script(
                pipe, scripts.REMOVE, [self._prefix + "s:" + key], key, self._prefix + "u:"
            )
            pipe.publish(self._channel, b"i:" + key.encode())
            return key

        results, key, _ = self._transact("invalidate", queue)
        _raise_errors("invalidate", results)
        return key

    def revoke(self, user: str) -> tuple[int, str]:
        """Delete every session filed under ``user`` (``user_key`` form) and publish the
        owner hash; returns how many live sessions were deleted, and the owner hash."""
        def queue(pipe: Any, secret: Secret) -> str:
            owner = self._owner(secret, user)
            index = self._prefix + "u:" + owner.hex()
            self._script(pipe, scripts.REVOKE, [index], owner, self._prefix + "s:")
            pipe.publish(self._channel, b"u:" + owner.hex().encode())
            return owner.hex()

        results, owner, _ = self._transact("invalidate_by_user", queue)
        _raise_errors("invalidate_by_user", results)
        deadlines = results[0]
        if self._clock is None:
            return len(deadlines), owner
        # Redis expires on its own clock; with a clock of ours, sessions past their deadline
        # on it were already misses, so they are not counted as dropped.
        now_ms = round(self._clock() * 1000)
        live = 0
        for raw in deadlines:
            (deadline,) = _DEADLINE.unpack(raw)
            live += deadline == 0 or now_ms < deadline
        return live, owner

    def add_secret_listener(self, listener: Listener) -> None:
        """Call ``listener()`` whenever this object learns that the shared secret changed
        (every key hash it gave out before is then stale)."""
        self._listeners.append(listener)

    def pubsub(self) -> Any:
        """A redis-py PubSub subscribed to nothing yet, on this cache's client."""
        return self._client.pubsub()

    @property
    def channel(self) -> str:
        return self._channel

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    @property
    def unavailable_errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions a call to the client raises when Redis is unreachable or refuses."""
        return self._errors

    # -- figures and lifetime ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This object's figures (Redis holds no counters of ours): ``unavailable`` counts
        calls that could not reach Redis or were refused, raised or not."""
        return {
            "backend": "redis",
            "prefix": self._prefix,
            "hits": self._hits,
            "misses": self._misses,
            "unavailable": self._unavailable,
            "decode_errors": self._decode_errors,
            "fail_open": self._fail_open,
            "shared_secret": self._fixed is None,
        }

    def close(self) -> None:
        """Close the client if this object made it from a URL (a client passed in is yours)."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"prefix={self._prefix!r}"
        return f"<RedisSessionCache {state}>"

    # -- helpers -------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise CacheClosed("this RedisSessionCache is closed")

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (client calls); any Redis or socket failure is ``CacheUnavailable``."""
        try:
            return fn()
        except self._errors as exc:
            self._unavailable += 1
            raise CacheUnavailable(
                f"Redis {op} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _hash(self, secret: Secret, token: str) -> str:
        mac = secret.key_mac.copy()
        mac.update(_args.token_bytes(token))
        return str(mac.hexdigest())

    def _owner(self, secret: Secret, user: str) -> bytes:
        mac = secret.user_mac.copy()
        mac.update(_args.token_bytes(user))
        return bytes(mac.digest())

    def _script(self, pipe: Any, script: scripts.Script, keys: list[str], *args: Any) -> None:
        # EVALSHA, not redis-py's Script objects: in a pipeline they ask SCRIPT EXISTS
        # first, a second round trip on every call. A NOSCRIPT reply is handled by _transact.
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    def _transact(
        self, op: str, queue: Callable[[Any, Secret], T]
    ) -> tuple[list[Any], T, Secret]:
        """Run the commands ``queue`` adds (given the secret to hash with) in one MULTI/EXEC;
        returns their results, what ``queue`` returned, and the secret.

        In shared-secret mode the transaction also reads the secret: if it is not the one
        the keys were hashed with, the secret is re-read and the commands run again under
        the new one, so no call ever acts on a key space other hosts no longer use.
        """
        self._ensure_open()
        for _ in range(_SECRET_TRIES):
            secret = self._current_secret(op)
            shared = self._fixed is None
            box: list[T] = []

            def run(secret: Secret = secret, shared: bool = shared, box: list[T] = box) -> Any:
                for attempt in range(2):
                    pipe = self._client.pipeline(transaction=True)
                    if shared:
                        pipe.get(self._secret_key)
                    box[:] = [queue(pipe, secret)]
                    results = pipe.execute(raise_on_error=False)
                    if attempt or not any(isinstance(r, self._no_script) for r in results):
                        return results
                    # A restarted Redis (or SCRIPT FLUSH) forgot our scripts, and the
                    # script did nothing: load them and run the transaction again.
                    for script in scripts.ALL:
                        self._client.script_load(script.text)
                return results

            results = list(self._call(op, run))
            if not shared:
                return results, box[0], secret
            if results[0] == secret.raw:
                return results[1:], box[0], secret
            # MULTI is not conditional: the commands also ran under the old keys, where a
            # set leaves an entry nobody reads (it expires) and a delete changed nothing
            # anyone reads. What counts is the run under the secret everybody uses now.
            self._forget_secret(secret)
        self._unavailable += 1
        raise CacheUnavailable(
            f"Redis {op} failed: {self._secret_key!r} changed {_SECRET_TRIES} times during "
            "one call (is something deleting it?)"
        )

    def _current_secret(self, op: str) -> Secret:
        secret = self._secret
        if secret is not None:
            return secret
        fresh = secrets.token_bytes(32)

        def load() -> Any:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._secret_key, fresh, nx=True)
            pipe.get(self._secret_key)
            return pipe.execute(raise_on_error=False)

        created, raw = self._call(op, load)
        if not isinstance(raw, bytes) or not raw:
            self._unavailable += 1
            raise CacheUnavailable(
                f"Redis key {self._secret_key!r} does not hold a shmcache secret "
                f"(got {type(raw).__name__}): does another program use the prefix "
                f"{self._prefix!r}?"
            )
        with self._secret_lock:
            secret = self._secret
            if secret is None or secret.raw != raw:
                secret = self._secret = derive(raw)
        if created is True:
            # A new secret orphans every key made under an old one: hosts that still hash
            # with the old one drop what they copied locally (TieredSessionCache) at once.
            self._call(op, lambda: self._client.publish(self._channel, b"c"))
        return secret

    def _forget_secret(self, stale: Secret) -> None:
        with self._secret_lock:
            if self._secret is stale:
                self._secret = None
        for listener in list(self._listeners):
            listener()

    def _decode(
        self, secret: Secret, raw: bytes, full: str, pttl: Any
    ) -> tuple[Any, float, str | None] | None:
        """``(session, seconds left, owner hash or None)``, or None for a miss."""
        if len(raw) < _VALUE_START:
            self._decode_errors += 1
            return None
        version, deadline, owner = _HEAD.unpack_from(raw)
        stored_mac = raw[_HEAD.size : _VALUE_START]
        payload = raw[_VALUE_START:]
        if version != _VERSION or not hmac.compare_digest(
            stored_mac, mac(secret, full, raw[: _HEAD.size], payload)
        ):
            self._decode_errors += 1
            return None
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


def _raise_errors(op: str, results: list[Any]) -> None:
    for result in results:
        if isinstance(result, Exception):
            raise CacheUnavailable(f"Redis refused {op}: {result}")
