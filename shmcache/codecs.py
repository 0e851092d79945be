"""Codecs turn a session object into the bytes stored in a slot's value area, and back.

A codec is any object with ``encode(obj) -> bytes`` and ``decode(bytes) -> obj``.

``PickleCodec`` is the default when a segment has a value area. Unpickling runs code chosen
by whoever wrote the bytes; that is acceptable here because only processes of the segment's
owner can write it (0600, and ``attach`` refuses segments owned by anyone else or writable
by group/others), and those processes can already run any code as that user. If your
sessions are plain data, ``JsonCodec`` avoids even that.

``PydanticCodec(Model)`` is the one to use for pydantic sessions (like the seed's
``Session``): JSON through the model (``model_dump_json`` / ``model_validate_json``), so
nothing is ever unpickled, it is smaller than pickle (the seed's ``Session``: about 213
bytes as JSON, 294-351 pickled) and it is safe wherever pickle is refused.
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


class PydanticCodec:
    """Sessions that are instances of one pydantic (v2) model, as the model's own JSON.

    ``decode`` validates the bytes through the model, so what comes back is a ``Model``
    (or the decode fails, which every backend counts as a miss, never an error). Needs
    pydantic (``pip install 'shmcache[pydantic]'``), imported by the model you pass.
    """

    def __init__(self, model: type[Any]) -> None:
        if not (
            isinstance(model, type)
            and callable(getattr(model, "model_validate_json", None))
            and callable(getattr(model, "model_dump_json", None))
        ):
            raise TypeError(
                f"PydanticCodec needs a pydantic v2 model class, got {model!r}"
            )
        self.model = model

    def encode(self, obj: Any) -> bytes:
        if not isinstance(obj, self.model):
            raise TypeError(
                f"PydanticCodec({self.model.__name__}) cannot encode a {type(obj).__name__}"
            )
        data: str = obj.model_dump_json()
        return data.encode()

    def decode(self, data: bytes) -> Any:
        return self.model.model_validate_json(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PydanticCodec) and other.model is self.model

    def __hash__(self) -> int:
        return hash((PydanticCodec, self.model))

    def __repr__(self) -> str:
        return f"PydanticCodec({self.model.__name__})"
