"""A Starlette app for the uvicorn-worker test: the same auth check as the demo app."""

from __future__ import annotations

import os
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shmcache.gunicorn import get_cache

_valid: set[str] = set()  # stands in for the database: tokens issued by /login


def _cache() -> Any:
    return get_cache()


async def login(request: Request) -> JSONResponse:
    token = secrets.token_urlsafe(32)
    _cache().set(token, {"user": "alice"}, 60)  # this worker validated it at login
    return JSONResponse({"token": token, "worker": os.getpid()})


async def me(request: Request) -> JSONResponse:
    token = request.headers.get("authorization", "")[7:]
    session = _cache().get(token)
    if session is None:
        return JSONResponse({"error": "not logged in", "worker": os.getpid()}, status_code=401)
    return JSONResponse({"user": session["user"], "cached": True, "worker": os.getpid()})


async def logout(request: Request) -> JSONResponse:
    token = request.headers.get("authorization", "")[7:]
    _cache().invalidate(token)
    return JSONResponse({"logged_out": True, "worker": os.getpid()})


app = Starlette(routes=[
    Route("/login", login, methods=["POST"]),
    Route("/me", me),
    Route("/logout", logout, methods=["POST"]),
])
