"""How one cache reaches its Redis: a plain or Sentinel-managed client, or a cluster.

Every call of the cache is one Lua script on the node that owns the cache's hash slot, sent
in a pipeline (one connection, one round trip) with, when the caller asks for it, a
``WAIT numreplicas timeout`` right behind it: WAIT counts the replicas that acknowledged
this connection's writes, so it must follow them on the same connection. On a cluster the
pipeline goes to that node's own client, and this module follows the cluster's MOVED and
ASK redirections itself.

Replies are recognised by the server's text (``NOSCRIPT``, ``MOVED``...), and failures by
the base classes of both client libraries, so redis-py and valkey-py clients behave the
same. Every transport failure or refused command becomes ``CacheUnavailable``. Knows
nothing of sessions.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import CacheUnavailable
from .client import error_types, is_cluster
from .scripts import Script

_REDIRECTS = 5  # MOVED/ASK/TRYAGAIN rounds (and one NOSCRIPT reload) before giving up
_TRYAGAIN_PAUSE = 0.02  # seconds, times the round
# Error replies by the class either library maps them to, for clients that strip the code.
_CODES = {
    "NoScriptError": "NOSCRIPT",
    "MovedError": "MOVED",
    "AskError": "ASK",
    "ReadOnlyError": "READONLY",
    "TryAgainError": "TRYAGAIN",
    "ClusterDownError": "CLUSTERDOWN",
    "MasterDownError": "MASTERDOWN",
    "BusyLoadingError": "LOADING",
    "OutOfMemoryError": "OOM",
}


def reply_code(reply: BaseException) -> str:
    """The error code of a server reply (``NOSCRIPT``, ``MOVED``...). Both libraries strip
    the code of the replies they know and raise a class named after it (the same names in
    both); other replies keep it as their first word."""
    code = _CODES.get(type(reply).__name__)
    if code is not None:
        return code
    text = str(reply)
    if text.startswith("No matching script"):
        return "NOSCRIPT"
    first = text.split(" ", 1)[0]
    return first if first.isupper() and first.isalpha() else ""


class Link:
    """One cache's connection to Redis (see the module docstring).

    ``make_client`` returns the client; it is called at the first use (a cluster client
    asks the nodes for the slot map when it is made). ``owns``: close it in ``close()``.
    ``failures`` counts the calls that raised ``CacheUnavailable``.
    """

    def __init__(self, make_client: Callable[[], Any], *, owns: bool) -> None:
        self._make = make_client
        self._client: Any = None
        self._owns = owns
        self._lock = threading.Lock()
        self._refresh = False  # a cluster node failed: ask for the slot map again first
        self.errors = error_types()
        self.failures = 0

    @property
    def client(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make()
                client = self._client
        return client

    def call(self, op: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (client calls); any Redis or socket failure is ``CacheUnavailable``."""
        try:
            return fn()
        except self.errors as exc:
            self._refresh = True
            raise self.unavailable(f"Redis {op} failed: {type(exc).__name__}: {exc}") from exc

    def unavailable(self, message: str, code: str = "") -> CacheUnavailable:
        """A ``CacheUnavailable`` to raise (counted), with the server's error ``code``."""
        self.failures += 1
        exc = CacheUnavailable(message)
        exc.code = code
        return exc

    def run(
        self,
        op: str,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        wait: int = 0,
        wait_ms: int = 0,
    ) -> tuple[Any, int | None]:
        """Run ``script`` on the node that owns ``keys[0]`` (all keys share its slot), then,
        if ``wait``, ``WAIT wait wait_ms`` on the same connection. Returns the script's reply
        and how many replicas acknowledged (None without ``wait``)."""
        command: tuple[Any, ...] = ("EVALSHA", script.sha, len(keys), *keys, *args)
        asking: tuple[str, int] | None = None
        for tries in range(_REDIRECTS):
            commands = [command, ("WAIT", wait, wait_ms)] if wait else [command]
            results = self.call(op, functools.partial(self._send, keys[0], commands, asking))
            reply = results[0]
            redirected, asking = asking, None
            if isinstance(reply, BaseException):
                code = reply_code(reply)
                if code == "NOSCRIPT" and command[0] == "EVALSHA":
                    # A restarted Redis (or SCRIPT FLUSH, or a failover) forgot the script,
                    # and it did nothing: send it whole; the node keeps it for next time.
                    command = ("EVAL", script.text, *command[2:])
                elif code == "MOVED":  # the slot has another owner now: read the map again
                    self._refresh = True
                elif code == "ASK":  # the slot is migrating, and this key already moved
                    asking = _address(reply)
                elif code == "TRYAGAIN":
                    # Mid-migration, some of the script's keys moved and some not yet: the
                    # resharding tool moves the rest within milliseconds. Ask the same node.
                    asking = redirected
                    time.sleep(_TRYAGAIN_PAUSE * (tries + 1))
                else:
                    raise self.unavailable(f"Redis refused {op}: {_describe(reply)}", code)
                continue
            acked = results[1] if wait else None
            if isinstance(acked, BaseException):
                raise self.unavailable(f"Redis refused WAIT after {op}: {_describe(acked)}")
            return reply, acked
        raise self.unavailable(
            f"Redis refused {op} {_REDIRECTS} times: {_describe(reply)}", reply_code(reply)
        )

    def sweep(self, op: str, patterns: Sequence[str], batch: int) -> int:
        """UNLINK every key matching ``patterns`` (SCAN, on every primary of a cluster);
        returns how many."""
        def run() -> int:
            target = self.client
            deleted = 0
            for pattern in patterns:
                pending: list[bytes] = []
                for key in target.scan_iter(match=pattern, count=batch):
                    pending.append(key)
                    if len(pending) >= batch:
                        deleted += target.unlink(*pending) or 0
                        pending = []
                if pending:
                    deleted += target.unlink(*pending) or 0
            return deleted

        return int(self.call(op, run))

    def pubsub(self) -> Any:
        """A PubSub on this client (on a cluster: one node's, which gets every message)."""
        return self.client.pubsub()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns:
            client.close()

    # -- helpers -----------------------------------------------------------------------

    def _send(
        self, key: str, commands: list[tuple[Any, ...]], asking: tuple[str, int] | None
    ) -> list[Any]:
        client = self.client
        target = client
        if is_cluster(client):
            if self._refresh:
                client.nodes_manager.initialize()
                self._refresh = False
            node = client.get_node_from_key(key) if asking is None else self._node(asking)
            connect = getattr(client, "get_redis_connection", None) or client.get_valkey_connection
            target = connect(node)
        pipe = target.pipeline(transaction=False)
        if asking is not None:
            pipe.execute_command("ASKING")
        for command in commands:
            pipe.execute_command(*command)
        results = list(pipe.execute(raise_on_error=False))
        return results[1:] if asking is not None else results

    def _node(self, address: tuple[str, int]) -> Any:
        client = self.client
        node = client.get_node(host=address[0], port=address[1])
        if node is None:  # a node the map does not know yet
            client.nodes_manager.initialize()
            node = client.get_node(host=address[0], port=address[1])
        if node is None:
            raise self.unavailable(f"Redis Cluster redirected to an unknown node {address}")
        return node


def _address(reply: BaseException) -> tuple[str, int]:
    address = getattr(reply, "node_addr", None)
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    host, _, port = str(reply).rsplit(" ", 1)[-1].rpartition(":")
    return host, int(port)


def _describe(reply: BaseException) -> str:
    code = reply_code(reply)
    text = str(reply)
    return text if not code or text.startswith(code) else f"{code} {text}"
