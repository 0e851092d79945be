"""``RedisSessionCache``: the ``SessionCache`` protocol on a Redis server that hosts share.

The shared-memory table ends at the host; when several hosts serve one app, a logout must
reach all of them, and Redis is the usual meeting point. redis-py (or valkey-py) is an
optional extra (``pip install 'shmcache[redis]'``): it is imported when a Redis cache is
made, so ``import shmcache`` works without it.

``RedisStore`` (``store.py``) makes the calls to Redis; this module checks the arguments,
applies ``fail_open`` and keeps the figures.
"""

from __future__ import annotations

from typing import Any

from .. import _args
from .._errors import InvalidArgument, InvalidType
from .._leases import DEFAULT_TIMEOUT as DEFAULT_LEASE_TIMEOUT
from .._protocol import UserIdOf
from ..codecs import Codec, JsonCodec, PickleCodec
from .client import check_client, client_from_url, import_library
from .keyring import Keyring
from .keys import Keys
from .link import Link
from .store import Clock, RedisStore, lease_ms

_DEFAULT_TIMEOUT = 1.0  # seconds; the client libraries' own default is to wait forever
_DEFAULT_REPLICA_TIMEOUT = 0.5  # seconds, for a client without a socket timeout


class RedisSessionCache(RedisStore):
    """A ``SessionCache`` on Redis (or Valkey): a logout on one host is a miss on every host.

    ``client`` is a URL or a client. URLs (``client.py`` has the grammar): ``redis://host:
    6379/0``, ``rediss://...``, ``unix:///path/redis.sock``, ``redis+cluster://host:7000,
    host:7001/``, ``redis+sentinel://host:26379,host:26380/SERVICE/0`` (and the same with
    ``valkey`` for valkey-py); the client gets ``timeout`` (default 1 s) as its socket and
    connect timeouts and one retry. A client object is a redis-py or valkey-py ``Redis``,
    ``RedisCluster`` or Sentinel ``master_for`` client made with ``decode_responses=False``
    (give it a ``socket_timeout``, or a stalled server stalls your requests); a Sentinel
    ``slave_for`` client is refused: a cache writes.

    Tokens never reach Redis: keys are keyed hashes of them. The secret of that hash is
    shared by every host in one of two ways:

    * ``secret=b"..."`` (from your secret store or environment, the same on every host):
      Redis alone reveals nothing, values written without the secret are refused, and the
      default codec is ``PickleCodec``.
    * ``secret=None`` (default): a random secret that the first process creates in Redis and
      all others read. Nothing to configure, and Redis dumps, replicas, ``MONITOR`` and slow
      logs hold no token. But whoever can read Redis can read the secret too: they cannot
      recover a token from a key, but they can check a guessed one and forge values. So the
      default codec is then ``JsonCodec``, and ``PickleCodec`` is refused (unpickling a
      forged value runs the forger's code). A secret that disappears (``FLUSHDB``, an
      ``allkeys-*`` eviction policy) is replaced once and noticed by every host at its next
      call: hosts never split into two key spaces.

    A fingerprint of the secret is stored beside the keys at first use: a host whose secret
    differs (or that passes ``secret=`` where the others do not) raises ``SecretMismatch``
    at construction (or at its first call, if Redis could not be reached then).

    ``fail_open=False`` (default): a Redis that cannot be reached or refuses a command
    raises ``CacheUnavailable`` (a ``ConnectionError``). ``fail_open=True``: ``get`` counts
    it (``stats()["unavailable"]``) and returns a miss; ``set`` counts it and stores
    nothing. ``invalidate``, ``invalidate_by_user`` and ``clear`` raise in both modes.

    ``min_replicas=N``: those three return only after ``N`` replicas acknowledged the write
    (``WAIT N``, for at most ``replica_timeout`` seconds: by default half the client's socket
    timeout), else raise ``CacheUnavailable``: a logout is never reported done when a
    failover could still lose it.

    ``clock`` is for tests: if given, each value also carries its deadline on that clock and
    is a miss from then on (Redis's own expiry still applies).

    ``set(..., user_id=)`` (or ``user_id_of(session)``, if given, when ``user_id`` is not)
    files the session under its user, so that ``invalidate_by_user`` on any host drops all
    of that user's sessions at once. User ids reach Redis only as keyed hashes, like tokens.

    Leases: if ``invalidate`` of a token (or ``invalidate_by_user`` of its user, or
    ``clear``) returns on any host after a ``get`` of it missed in some thread and before
    that thread's next ``set`` of it, that set is not stored (and deletes the token's entry):
    a validation that raced a logout never puts the logged-out token back. A set with no
    miss before it (a fresh login) is stored as always. A lease older than
    ``lease_timeout`` seconds (default 10, on ``clock`` if given and on the server's clock)
    is void: its set is not stored either. ``stats()["lease_drops"]`` counts this object's
    dropped sets. Cost: no extra round trip; each logout keeps a mark of about 100 bytes in
    Redis for ``lease_timeout`` + 1 s (``scripts.py`` has the design).
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
        min_replicas: int = 0,
        replica_timeout: float | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    ) -> None:
        import_library()
        lease_timeout = _args.positive_number("lease_timeout", lease_timeout)
        if user_id_of is not None and not callable(user_id_of):
            raise InvalidType(f"user_id_of must be callable, got {type(user_id_of).__name__}")
        if not isinstance(fail_open, bool):
            raise InvalidArgument(f"fail_open must be True or False, got {fail_open!r}")
        if type(min_replicas) is not int or min_replicas < 0:
            raise InvalidArgument(f"min_replicas must be an int >= 0, got {min_replicas!r}")
        keys = Keys.of(prefix)
        if codec is None:
            codec = JsonCodec() if secret is None else PickleCodec()
        elif secret is None and isinstance(codec, PickleCodec):
            raise InvalidArgument(
                "PickleCodec needs secret=: without it the secret lives in Redis, and whoever "
                "can write Redis could make get() unpickle (run) their code; pass secret= "
                "from your environment, or use JsonCodec"
            )
        if isinstance(client, str):
            url_timeout = _DEFAULT_TIMEOUT if timeout is None else timeout
            link = Link(client_from_url(client, url_timeout), owns=True)
            socket_timeout: float | None = url_timeout
        else:
            if timeout is not None:
                raise InvalidArgument(
                    "timeout applies to a client made from a URL; set socket_timeout on the "
                    "client you pass instead"
                )
            check_client(client)
            kwargs = getattr(client, "get_connection_kwargs", None)
            socket_timeout = kwargs().get("socket_timeout") if callable(kwargs) else None
            link = Link(lambda: client, owns=False)
        if replica_timeout is None:
            replica_timeout = (socket_timeout or 2 * _DEFAULT_REPLICA_TIMEOUT) / 2
        replica_timeout = _args.positive_number("replica_timeout", replica_timeout)
        if socket_timeout and replica_timeout >= socket_timeout:
            raise InvalidArgument(
                f"replica_timeout ({replica_timeout} s) must be shorter than the client's "
                f"socket timeout ({socket_timeout} s), or WAIT outlasts the connection"
            )
        keyring = Keyring(link, keys, secret, lease_ms(lease_timeout))
        super().__init__(
            link, keys, keyring, codec, clock, min_replicas, replica_timeout, lease_timeout
        )
        self._fail_open = fail_open
        self._user_id_of = user_id_of
        self._hits = 0
        self._misses = 0
        keyring.check()

    # -- the SessionCache protocol -------------------------------------------------------

    def invalidate(self, token: str) -> None:
        """Delete ``token`` in Redis and announce it; raises ``CacheUnavailable`` rather
        than return without having deleted it (whatever ``fail_open`` says), or, with
        ``min_replicas``, before that many replicas have it."""
        super().invalidate(token)

    def invalidate_by_user(self, user_id: str | int) -> int:
        """Delete every session of ``user_id`` (compared by ``str()``) and announce it;
        returns how many live sessions were deleted. Raises ``CacheUnavailable`` rather
        than return without Redis (and ``min_replicas`` replicas) having deleted them.

        After it returns, no session of that user that was set before it was called is
        left, and none set while it ran escapes a later call: the ``set`` script writes a
        session and its index entry as one command, and the revoke script reads the index,
        deletes each member that still belongs to the user, and deletes the index, as one
        command. A ``set`` runs wholly before it (its session is in the index and deleted)
        or wholly after it (it starts a new index that the next revoke finds). Cost: one
        command that holds Redis for its duration, O(sessions in the user's index).
        """
        return super().invalidate_by_user(user_id)

    def clear(self) -> None:
        """Delete every session (and user index) under this prefix (SCAN + UNLINK on every
        primary, never FLUSHDB: other data stays), then announce it. O(keys in the
        database); raises ``CacheUnavailable`` if Redis cannot be reached."""
        self.wipe()


    # -- figures and lifetime ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This object's figures (Redis holds no counters of ours): ``unavailable`` counts
        calls that could not reach Redis or were refused, raised or not."""
        return {
            "backend": "redis",
            "prefix": self._keys.prefix,
            "hits": self._hits,
            "misses": self._misses,
            "unavailable": self._link.failures,
            "decode_errors": self._decode_errors,
            "lease_drops": self._lease_drops,
            "lease_timeout": self._leases.timeout,
            "fail_open": self._fail_open,
            "shared_secret": self._keyring.shared,
            "min_replicas": self._min_replicas,
        }

    def close(self) -> None:
        """Close the client if this object made it from a URL (a client passed in is yours)."""
        if self._closed:
            return
        self._closed = True
        self._link.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"prefix={self._keys.prefix!r}"
        return f"<RedisSessionCache {state}>"

