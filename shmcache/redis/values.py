"""The bytes of one session value in Redis, and the check that a value is ours.

A value is ``version (1 byte, 2) | deadline (int64 LE, ms on the writer's clock, 0: none) |
owner (16 bytes: the user's hash, zeros: none) | MAC (16 bytes) | codec bytes``. The MAC is
a keyed BLAKE2b of the key and the rest, so a value moved to another token's key or user,
truncated, or written by a program that does not hold the secret is refused, never taken
for somebody else's session. Version 1 values (no owner) are refused too. The scripts in
``scripts.py`` read the header. Pure functions: no I/O, no codec.
"""

from __future__ import annotations

import hmac
import struct
from typing import Any

from . import scripts
from .secret import MAC_SIZE, Secret, mac

VERSION = scripts.VERSION
_HEAD = struct.Struct("<Bq16s")  # version, deadline ms, owner
_START = _HEAD.size + MAC_SIZE
_DEADLINE = struct.Struct("<q")
MAX_MS = (1 << 63) - 1


def pack(secret: Secret, full_key: str, deadline: int, owner: bytes, payload: Any) -> bytes:
    head = _HEAD.pack(VERSION, deadline, owner)
    return head + mac(secret, full_key, head, payload) + bytes(payload)


def unpack(secret: Secret, full_key: str, raw: bytes) -> tuple[int, bytes, bytes] | None:
    """``(deadline ms, owner, payload)`` of a value that is ours, else None."""
    if len(raw) < _START:
        return None
    version, deadline, owner = _HEAD.unpack_from(raw)
    payload = raw[_START:]
    if version != VERSION or not hmac.compare_digest(
        raw[_HEAD.size : _START], mac(secret, full_key, raw[: _HEAD.size], payload)
    ):
        return None
    return deadline, owner, payload


def deadline_of(raw: bytes) -> int:
    """The deadline bytes the revoke script returns, as ms (0: none)."""
    return int(_DEADLINE.unpack(raw)[0])
