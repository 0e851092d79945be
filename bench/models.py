"""The seed app's pydantic session model, importable without side effects (``fastapi_app``
builds its cache and counters when imported; ``memory`` only needs the model)."""

from __future__ import annotations

from pydantic import BaseModel


class Session(BaseModel):
    """The seed app's session model."""

    id: int
    token: str
    created_at: str
    expires_at: str
