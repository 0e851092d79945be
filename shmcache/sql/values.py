"""What a row's bytes mean: the keyed hashes that stand for tokens and users, and the value
format, sealed with a MAC.

Layer: the backend's record format (no SQL, no connections, no codec). The keys and MACs
are the Redis backend's (``shmcache.redis.secret``): under one secret both backends hash a
token to the same 16 bytes.

A value is ``version (1 byte, 1) | MAC (16 bytes) | codec bytes``. The MAC is a keyed
BLAKE2b of ``"{table}:{key hex}"``, the version, the owner (16 zero bytes: none) and the
codec bytes, so a value moved to another token, user or table, truncated, or written by
anything that does not hold the secret does not open.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from .. import _args
from ..redis.secret import MAC_SIZE, Secret, derive, mac

VERSION = b"\x01"
NO_OWNER = bytes(16)
VALUE_START = 1 + MAC_SIZE

__all__ = ["Secret", "derive", "fingerprint", "keyed", "open_value", "seal"]


def fingerprint(raw: bytes) -> bytes:
    """What the meta row keeps to tell secrets apart (never the secret itself)."""
    return hashlib.blake2b(raw, digest_size=16, person=b"shmcache-fprint").digest()


def keyed(state: Any, text: str) -> bytes:
    """``text`` (a token, or a user id in ``user_key`` form) hashed with one of the
    secret's keyed states (``key_mac``, ``user_mac``)."""
    digest = state.copy()
    digest.update(_args.token_bytes(text))
    return bytes(digest.digest())


def seal(secret: Secret, table: str, key: bytes, owner: bytes | None, payload: bytes) -> bytes:
    head = VERSION + (owner or NO_OWNER)
    return VERSION + mac(secret, f"{table}:{key.hex()}", head, payload) + payload


def open_value(
    secret: Secret, table: str, key: bytes, owner: bytes | None, value: bytes
) -> bytes | None:
    """The codec bytes of a row, or None if its format or MAC is wrong."""
    if (len(key) != 16 or len(value) < VALUE_START or value[:1] != VERSION
            or (owner is not None and len(owner) != 16)):
        return None
    payload = value[VALUE_START:]
    head = VERSION + (owner or NO_OWNER)
    expected = mac(secret, f"{table}:{key.hex()}", head, payload)
    return payload if hmac.compare_digest(value[1:VALUE_START], expected) else None
