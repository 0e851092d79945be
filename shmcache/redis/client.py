"""Building a Redis client: from a URL, or checking one the caller made.

Two client libraries work: redis-py (``redis``) and valkey-py (``valkey``); their clients
have the same methods, and only their exception classes differ (``link.py`` recognises
replies by the server's text, not by either library's classes). A URL picks the topology::

    redis://[user:password@]host:6379/0     rediss:// (TLS)    unix:///path/redis.sock?db=0
    redis+cluster://host:7000[,host:7001...]/        rediss+cluster://...      Redis Cluster
    redis+sentinel://host:26379[,host:26379...]/SERVICE[/db]   rediss+sentinel://...
                                            the primary of SERVICE, as the Sentinels say

``valkey://``, ``valkeys://``, ``valkey+cluster://``... are the same with valkey-py; the
``redis`` forms use redis-py if it is installed, else valkey-py. In a Sentinel URL,
``user:password@`` is the data nodes'; the Sentinels' own are ``sentinel_username`` and
``sentinel_password``. Knows nothing of sessions; ``cache.py`` and ``shmcache._open`` use it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import _args
from .._errors import InvalidArgument, InvalidType

BASES = ("redis", "rediss", "valkey", "valkeys", "unix")
TOPOLOGIES = ("", "cluster", "sentinel")
SCHEMES = tuple(
    base + ("+" + topology if topology else "")
    for base in BASES
    for topology in TOPOLOGIES
    if base != "unix" or not topology
)
_TLS = {"rediss", "valkeys"}
_DEFAULT_PORT = {"": 6379, "cluster": 6379, "sentinel": 26379}
_SENTINEL_PARAMS = {"sentinel_username", "sentinel_password"}
# Connection options that the libraries' URL parsers pass through as strings (TLS files
# and the like); the rest of what they accept comes from their own tables at run time.
_PASSTHROUGH = {
    "client_name", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile",
    "ssl_keyfile", "ssl_cert_reqs", "ssl_password", "ssl_check_hostname", "ssl_min_version",
}
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+))(?::(?P<port>\d+))?$")


@dataclass(frozen=True)
class Library:
    """redis-py or valkey-py, and the names its classes go by."""

    name: str  # the import name: "redis" or "valkey"
    module: ModuleType
    display: str  # "redis-py" or "valkey-py"
    client_class: Any  # redis.Redis / valkey.Valkey
    url_params: dict[str, Callable[[str], Any]]

    def submodule(self, name: str) -> Any:
        return importlib.import_module(f"{self.name}.{name}")

    def cluster_classes(self) -> tuple[Any, Any]:
        cluster = self.submodule("cluster")
        main = getattr(cluster, "RedisCluster", None) or cluster.ValkeyCluster
        return main, cluster.ClusterNode

    def no_retry_but_one(self) -> Any:
        # One retry: a pooled connection that Redis closed (a restart, an idle timeout)
        # fails once and is replaced; the libraries' defaults (retries with backoff) would
        # hold every request for seconds when Redis is really down.
        return self.submodule("retry").Retry(self.submodule("backoff").NoBackoff(), 1)


def import_library(name: str | None = None) -> Library:
    """valkey-py for ``"valkey"``; else redis-py, or valkey-py if only that is installed.
    Raises an ``ImportError`` that says how to get one."""
    for candidate in (name,) if name else ("redis", "valkey"):
        try:
            module = importlib.import_module(candidate)
        except ImportError:
            continue
        client_class = getattr(module, "Redis", None) if candidate == "redis" else None
        client_class = client_class or getattr(module, "Valkey", None) or module.Redis
        display = "redis-py" if candidate == "redis" else "valkey-py"
        return Library(candidate, module, display, client_class, _url_table(candidate))
    if name == "valkey":
        raise ImportError("valkey:// URLs need valkey-py: pip install 'shmcache[valkey]'")
    raise ImportError(
        "the Redis backend needs redis-py (or valkey-py): pip install 'shmcache[redis]' "
        "(or 'shmcache[valkey]')"
    )


def _url_table(name: str) -> dict[str, Callable[[str], Any]]:
    for where in ("connection", "_parsers.url_parser"):
        try:
            table = importlib.import_module(f"{name}.{where}").URL_QUERY_ARGUMENT_PARSERS
        except (ImportError, AttributeError):
            continue
        return dict(table)
    return {}


def error_types() -> tuple[type[BaseException], ...]:
    """What a call through either library raises when Redis is unreachable, times out or
    refuses (cluster clients have a base class of their own, outside the main one)."""
    found: list[type[BaseException]] = [OSError]
    for module, names in (
        ("redis.exceptions", ("RedisError", "RedisClusterException")),
        ("valkey.exceptions", ("ValkeyError", "ValkeyClusterException")),
    ):
        try:
            exceptions = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(exceptions, n) for n in names if hasattr(exceptions, n)]
    return tuple(found)


def is_cluster(client: Any) -> bool:
    return callable(getattr(client, "get_node_from_key", None)) and hasattr(
        client, "nodes_manager"
    )


def check_client(client: Any) -> None:
    """Refuse what cannot serve as the cache's client, before anything is sent."""
    if not callable(getattr(client, "pipeline", None)):
        raise InvalidType(
            f"client must be a redis-py or valkey-py client or a URL, got {type(client).__name__}"
        )
    kwargs = getattr(client, "get_connection_kwargs", None)
    if callable(kwargs) and kwargs().get("decode_responses"):
        raise InvalidArgument("the client must return bytes: make it with decode_responses=False")
    if getattr(getattr(client, "connection_pool", None), "is_master", True) is False:
        raise InvalidArgument(
            "the client talks to a Sentinel replica (slave_for): a cache writes on every "
            "logout, and a replica refuses writes; pass sentinel.master_for(SERVICE)"
        )


def scheme_of(url: str) -> tuple[str, str]:
    """``(base, topology)`` of a Redis URL, e.g. ``("rediss", "cluster")``."""
    scheme = url.partition("://")[0].lower()
    base, _, topology = scheme.partition("+")
    if base not in BASES or topology not in TOPOLOGIES or (base == "unix" and topology):
        raise InvalidArgument(
            f"{redact(url)!r}: not a Redis URL; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    return base, topology


def library_params(url: str) -> set[str]:
    """The query parameters ``client_from_url`` accepts for ``url``'s scheme."""
    base, topology = scheme_of(url)
    lib = import_library("valkey" if base.startswith("valkey") else None)
    # "timeout" is in redis-py's table, but its connections reject it: it is ours.
    known = {*lib.url_params, *_PASSTHROUGH} - {"timeout"}
    if topology == "sentinel":
        known |= _SENTINEL_PARAMS
    if topology == "cluster":
        known.discard("db")  # a cluster has database 0 only
    return known


def client_from_url(url: str, timeout: float) -> Callable[[], Any]:
    """What makes the client for ``url``, with ``timeout`` as its socket and connect
    timeouts. Everything in the URL is checked now; a cluster client is made at its first
    use (see ``Link``): its constructor asks the nodes for the slot map, and a cluster that
    is down must not keep the app from starting (``fail_open`` serves misses)."""
    timeout = _args.positive_number("timeout", timeout)
    base, topology = scheme_of(url)
    lib = import_library("valkey" if base.startswith("valkey") else None)
    known = library_params(url)
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    for key, _ in query:
        if key not in known:
            raise InvalidArgument(
                f"parameter {key!r} in {redact(url)!r} is not a {lib.display} connection option "
                "(pass prefix, timeout and fail_open as arguments, or use open_cache)"
            )
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    parts = urlsplit(url)
    try:
        if not topology:
            if base != "unix":
                parts.port  # noqa: B018  (urlsplit checks the port only when asked)
                if parts.path not in ("", "/") and not parts.path.strip("/").isdigit():
                    raise InvalidArgument(f"{redact(url)!r}: the path must be a database number")
            elif not parts.path:
                raise InvalidArgument(
                    f"{redact(url)!r}: give the socket path, unix:///path/redis.sock"
                )
            client = lib.client_class.from_url(url, retry=lib.no_retry_but_one(), **common)
            return lambda: client
        options = {k: lib.url_params.get(k, str)(v) for k, v in query}
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"bad Redis URL {redact(url)!r}: {exc}") from None
    user, password, hosts = _hosts(url, _DEFAULT_PORT[topology])
    if user:
        common["username"] = user
    if password:
        common["password"] = password
    if base in _TLS:
        common["ssl"] = True
    if topology == "cluster":
        return _cluster(lib, url, hosts, {**options, **common})
    client = _sentinel(lib, url, hosts, options, common, timeout)
    return lambda: client


def _cluster(
    lib: Library, url: str, hosts: list[tuple[str, int]], options: dict[str, Any]
) -> Callable[[], Any]:
    path = urlsplit(url).path
    if path not in ("", "/", "/0"):
        raise InvalidArgument(f"{redact(url)!r}: a Redis Cluster has database 0 only")
    cluster, node = lib.cluster_classes()
    return lambda: cluster(startup_nodes=[node(h, p) for h, p in hosts], **options)


def _sentinel(
    lib: Library,
    url: str,
    hosts: list[tuple[str, int]],
    options: dict[str, Any],
    common: dict[str, Any],
    timeout: float,
) -> Any:
    parts = [unquote(p) for p in urlsplit(url).path.split("/")[1:]]
    if parts and parts[-1] == "":
        parts.pop()
    if not parts or not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise InvalidArgument(
            f"{redact(url)!r}: write the service as redis+sentinel://host:26379/SERVICE[/db]"
        )
    if len(parts) == 2 and "db" in options:
        raise InvalidArgument(f"{redact(url)!r}: the database is given twice")
    db = int(parts[1]) if len(parts) == 2 else int(options.pop("db", 0))
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    for ours, theirs in (("sentinel_username", "username"), ("sentinel_password", "password")):
        if ours in options:
            sentinel_kwargs[theirs] = options.pop(ours)
    if common.get("ssl"):
        sentinel_kwargs["ssl"] = True
    sentinel = lib.submodule("sentinel").Sentinel(
        hosts, sentinel_kwargs=sentinel_kwargs, retry=lib.no_retry_but_one(), **common,
        **options,
    )
    return sentinel.master_for(parts[0], db=db)


def _hosts(url: str, default_port: int) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    netloc = urlsplit(url).netloc
    userinfo, _, hostlist = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        match = _HOST.match(item)
        if match is None or not 0 < int(match["port"] or default_port) < 65536:
            raise InvalidArgument(
                f"{redact(url)!r}: {item!r} is not host:port (give host:port[,host:port...])"
            )
        hosts.append((match["v6"] or match["host"], int(match["port"] or default_port)))
    return unquote(user) or None, unquote(password) or None, hosts


def redact(url: str) -> str:
    """``url`` without its password (nor ``sentinel_password``), for messages and logs."""
    url = re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"([?&]sentinel_password=)[^&#]*", r"\1***", url)
