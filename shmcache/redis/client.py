"""Building a redis-py client: from a URL, or checking one the caller made.

Knows nothing of sessions; ``cache.py`` and ``shmcache._open`` use it.
"""

from __future__ import annotations

import re
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import _args
from .._errors import InvalidArgument, InvalidType


def import_redis() -> ModuleType:
    """The redis-py package, or an ``ImportError`` that says how to get it."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError(
            "the Redis backend needs redis-py: pip install 'shmcache[redis]'"
        ) from exc
    return redis


def check_client(client: Any) -> None:
    if not callable(getattr(client, "pipeline", None)):
        raise InvalidType(
            f"client must be a redis-py client or a URL, got {type(client).__name__}"
        )
    kwargs = getattr(client, "get_connection_kwargs", None)
    if callable(kwargs) and kwargs().get("decode_responses"):
        raise InvalidArgument("the client must return bytes: make it with decode_responses=False")


# redis-py connection options that its URL parser passes through as strings (TLS files
# and the like); the rest of what it accepts comes from its own table at run time.
_REDIS_PY_EXTRA = {
    "client_name", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile",
    "ssl_keyfile", "ssl_cert_reqs", "ssl_password", "ssl_check_hostname", "ssl_min_version",
}


def redis_py_url_params() -> set[str]:
    """The query parameters redis-py's ``from_url`` turns into connection options."""
    import_redis()
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    # "timeout" is in redis-py's table, but its connections reject it: it is ours.
    return {*URL_QUERY_ARGUMENT_PARSERS, *_REDIS_PY_EXTRA} - {"timeout"}


def client_from_url(redis: ModuleType, url: str, timeout: float) -> Any:
    timeout = _args.positive_number("timeout", timeout)
    known = redis_py_url_params()
    for key, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in known:
            raise InvalidArgument(
                f"parameter {key!r} in {redact(url)!r} is not a redis-py connection option "
                "(pass prefix, timeout and fail_open as arguments, or use open_cache)"
            )
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        # One retry: a pooled connection that Redis closed (a restart, an idle timeout)
        # fails once and is replaced; redis-py's default of 10 retries with backoff would
        # hold every request for seconds when Redis is really down.
        return redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad Redis URL {redact(url)!r}: {exc}") from None


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)

