"""Codecs turn a session object into the bytes stored in a slot's value area, and back.

A codec is any object with ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``.

``PickleCodec`` is the default when a segment has a value area. Unpickling runs code chosen
by whoever wrote the bytes; that is acceptable here because only processes of the segment's
owner can write it (0600, and ``attach`` refuses segments owned by anyone else or writable
by group/others), and those processes can already run any code as that user. If your
sessions are plain data, ``JsonCodec`` avoids even that.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Codec(Protocol):
    def encode(self, obj: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


class PickleCodec:
    """Any picklable session (pydantic models, dataclasses, dicts)."""

    def encode(self, obj: Any) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> Any:
        return pickle.loads(data)

    def __eq__(self, other: object) -> bool:
        return type(other) is PickleCodec

    def __hash__(self) -> int:
        return hash(PickleCodec)


class JsonCodec:
    """Sessions that are JSON data (dicts, lists, str, numbers), compactly encoded."""

    def encode(self, obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)

    def __eq__(self, other: object) -> bool:
        return type(other) is JsonCodec

    def __hash__(self) -> int:
        return hash(JsonCodec)
