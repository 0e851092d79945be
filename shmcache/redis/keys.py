"""The key layout of the Redis backend: every key of one cache in one Redis Cluster hash slot.

A Lua script (or a WAIT after it) acts on one node, so every key a script touches must live
in one hash slot; Redis Cluster refuses anything else (CROSSSLOT). Each key is therefore
the prefix wrapped in braces (the cluster's *hash tag*: only the part between the first
``{`` and the next ``}`` is hashed), then what it is. With the default prefix::

    {shmcache:}fingerprint    "fixed:<32 hex>" or "shared:<32 hex>": a keyed hash of the
                              secret in use, written at first use; a host whose secret
                              differs refuses to start (``SecretMismatch``)
    {shmcache:}secret         the hashing secret, in shared-secret mode only (no secret=)
    {shmcache:}s:<32 hex>     one session: keyed BLAKE2b-128 of the token, with a PX expiry
    {shmcache:}u:<32 hex>     one user's sessions: keyed BLAKE2b-128 of str(user_id)
    {shmcache:}clock          the logout clock (leases, see ``scripts.py``): a number
    {shmcache:}horizon        the longest lease_timeout (ms) of the clients that missed
                              lately, with a PX expiry
    {shmcache:}cleared        the logout mark of the last clear, with a PX expiry
    {shmcache:}ls:<32 hex>    the logout mark of one token (its session's key hash)
    {shmcache:}lu:<32 hex>    the logout mark of one user (its index's hash)
    {shmcache:}invalidations  the pub/sub channel (a channel, not a key)

Logout marks live ``lease_timeout`` plus a second, then expire: they take memory for the
logouts of the last few seconds only (``clear`` leaves them: they are what voids leases).

The cost, on a cluster: one cache lives on one primary (and its replicas); the cluster
gives it failover, not sharding. Caches with different prefixes land on different slots.
On a single Redis the braces change nothing. Pure data: no I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._errors import InvalidArgument

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
# After the tag. The scripts name the lease keys from the fingerprint key's tag themselves
# (``scripts.py``), so these are the one spelling of them.
FINGERPRINT = "fingerprint"
CLOCK, HORIZON, CLEARED = "clock", "horizon", "cleared"
SESSION_MARKS, USER_MARKS = "ls:", "lu:"


@dataclass(frozen=True)
class Keys:
    """The names of one cache's keys (see the module docstring)."""

    prefix: str
    tag: str
    fingerprint: str
    secret: str
    sessions: str  # + key hash
    users: str  # + owner hash
    channel: str
    clock: str
    horizon: str
    cleared: str
    session_marks: str  # + key hash
    user_marks: str  # + owner hash

    @classmethod
    def of(cls, prefix: str) -> Keys:
        if not isinstance(prefix, str) or not prefix:
            raise InvalidArgument(f"prefix must be a non-empty str, got {prefix!r}")
        if "{" in prefix or "}" in prefix:
            raise InvalidArgument(
                f"prefix {prefix!r} must not contain braces: shmcache wraps it in braces "
                "itself, so that every key of the cache is in one Redis Cluster hash slot"
            )
        tag = "{" + prefix + "}"
        return cls(
            prefix=prefix,
            tag=tag,
            fingerprint=tag + FINGERPRINT,
            secret=tag + "secret",
            sessions=tag + "s:",
            users=tag + "u:",
            channel=tag + "invalidations",
            clock=tag + CLOCK,
            horizon=tag + HORIZON,
            cleared=tag + CLEARED,
            session_marks=tag + SESSION_MARKS,
            user_marks=tag + USER_MARKS,
        )

    def patterns(self) -> tuple[str, str]:
        """SCAN patterns of the sessions and user indexes (glob characters escaped)."""
        escaped = _GLOB_SPECIALS.sub(r"\\\1", self.tag)
        return escaped + "s:*", escaped + "u:*"
