"""Argument checks shared by the backends that are not the shared-memory table.

They give the same answers as ``SharedMemorySessionCache`` (the contract suite holds every
backend to them): a non-``str`` token is ``InvalidType``; ``set`` with an empty token, or a
TTL that is not a finite positive real number, is ``InvalidArgument``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

from ._errors import InvalidArgument, InvalidType

MAX_TTL = 1e15  # seconds (31 million years): longer is stored as this, never an overflow


def check_token(token: object) -> str:
    if not isinstance(token, str):
        raise InvalidType(f"token must be a str, got {type(token).__name__}")
    return token


def check_set_args(token: object, ttl_seconds: object) -> float:
    """The TTL to use for a ``set``, or the error a rejected ``set`` raises."""
    check_token(token)
    if not token:
        raise InvalidArgument("token must not be empty")
    return ttl(ttl_seconds)


def ttl(ttl_seconds: object) -> float:
    """A TTL as a float, clamped to ``MAX_TTL``; ``InvalidArgument`` unless finite and > 0."""
    value: Any = ttl_seconds
    bad = isinstance(value, bool) or not isinstance(value, Real)
    # Comparisons only (no float() first): int(10**400) is finite but overflows a float.
    if bad or not value > 0 or value == math.inf:
        raise InvalidArgument(f"ttl_seconds must be a finite positive number, got {value!r}")
    return MAX_TTL if value > MAX_TTL else float(value)


def token_bytes(token: str) -> bytes:
    # surrogatepass: any str hashes, even one with lone surrogates (get must never raise).
    return token.encode("utf-8", "surrogatepass")


def positive_number(name: str, value: object) -> float:
    """A finite positive float option (timeouts, staleness bounds)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArgument(f"{name} must be a finite positive number, got {value!r}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise InvalidArgument(f"{name} must be a finite positive number, got {value!r}")
    return number


def user_key(user_id: object) -> str:
    """A user id as the caches compare it: ``str()`` of a str or an int, so the admin
    command's ``7`` matches ``user_id=7``."""
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
        raise InvalidType(f"user_id must be a str or an int, got {type(user_id).__name__}")
    key = str(user_id)
    if not key:
        raise InvalidArgument("user_id must not be empty")
    return key
