"""The keyed hashes of the Redis backend: one root secret, a derived key per purpose.

Tokens and user ids reach Redis only as keyed BLAKE2b hashes; values carry a MAC bound to
their key, so a value moved to another key, or written without the secret, is refused.
The fingerprint stored beside the keys is one more keyed hash of the root: it tells two
secrets apart without revealing either. Pure functions: no I/O here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

MAC_SIZE = 16
FIXED = "fixed:"  # fingerprint of a secret= given by the caller
SHARED = "shared:"  # fingerprint of a secret created in Redis (no secret= given)


@dataclass(frozen=True)
class Secret:
    raw: bytes  # as stored in Redis (shared mode) or as given
    key_mac: Any  # blake2b state keyed for token -> key, copied per use
    value_mac: Any  # blake2b state keyed for value authentication
    user_mac: Any  # blake2b state keyed for user id -> owner
    fingerprint: str  # FIXED or SHARED + 32 hex digits


def derive(raw: bytes, *, shared: bool) -> Secret:
    root = hashlib.blake2b(raw, digest_size=32, person=b"shmcache-root").digest()
    check = hashlib.blake2b(b"fingerprint", key=root, digest_size=16, person=b"shmcache-check")
    return Secret(
        raw,
        hashlib.blake2b(key=root, digest_size=16, person=b"shmcache-key"),
        hashlib.blake2b(key=root, digest_size=MAC_SIZE, person=b"shmcache-value"),
        hashlib.blake2b(key=root, digest_size=16, person=b"shmcache-user"),
        (SHARED if shared else FIXED) + check.hexdigest(),
    )


def mac(secret: Secret, full: str, head: bytes, payload: Any) -> bytes:
    mac = secret.value_mac.copy()
    mac.update(full.encode())
    mac.update(head)
    mac.update(payload)
    return bytes(mac.digest())
