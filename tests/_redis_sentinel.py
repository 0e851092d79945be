"""A primary, its replica and three Sentinels for the tests, on loopback, stopped by pid.

Nothing here is a test. The replica replicates through ``LinkProxy``, so a test can cut
that link silently (a partition: both sockets stay open, nothing gets through), then kill
the primary and wait for the Sentinels to promote the replica.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from _redis_topologies import Node, wait_for

SERVICE = "mymaster"


class LinkProxy:
    """A TCP relay from a local port to ``target_port``. ``cut()`` keeps every socket open
    and drops whatever arrives, both ways: a partition that neither end is told about.
    ``close()`` ends it (the ends then see the connection reset)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.cut_event = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = [self._listener]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.cut_event.set()

    def _accept(self) -> None:
        while not self._closed:
            try:
                near, _ = self._listener.accept()
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            self._sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.cut_event.is_set():
                    sink.sendall(data)
        if not self.cut_event.is_set():
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()


class SentinelGroup:
    """A primary, one replica (replicating through a ``LinkProxy``) and three Sentinels
    (quorum 2) watching ``SERVICE``; failover within seconds of the primary's death."""

    def __init__(self, binary: str | None = None) -> None:
        self.nodes: list[Node] = []
        self.proxy: LinkProxy | None = None
        try:
            self.primary = self._add(Node(binary).start())
            self.proxy = LinkProxy(self.primary.port)
            self.replica = self._add(
                Node(binary).start(f"replicaof 127.0.0.1 {self.proxy.port}")
            )
            wait_for(
                lambda: self.replica.client().info("replication").get("master_link_status")
                == "up",
                "replica in sync",
            )
            self.sentinels = [
                self._add(
                    Node(binary, sentinel=True).start(
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2",
                        f"sentinel down-after-milliseconds {SERVICE} 400",
                        # Long: a Sentinel "fixes" a replica that replicates from an address
                        # other than the primary's (our proxy) only after this long.
                        f"sentinel failover-timeout {SERVICE} 60000",
                    )
                )
                for _ in range(3)
            ]
            for sentinel in self.sentinels:
                client = sentinel.client()
                wait_for(
                    lambda c=client: len(c.execute_command("SENTINEL", "SENTINELS", SERVICE)) == 2
                    and len(c.execute_command("SENTINEL", "REPLICAS", SERVICE)) == 1,
                    "Sentinels that know each other and the replica",
                )
                client.close()
        except BaseException:
            self.close()
            raise

    def _add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def url(self, scheme: str = "redis") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"{scheme}+sentinel://{hosts}/{SERVICE}/0"

    def primary_port(self) -> int:
        client = self.sentinels[0].client()
        try:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])
        finally:
            client.close()

    def cut_replica_link(self) -> None:
        assert self.proxy is not None
        self.proxy.cut()

    def kill_primary_and_wait_failover(self) -> None:
        """SIGKILL the primary, end the cut link (the replica sees it drop), and wait until
        the Sentinels name the replica as the new primary and it acts as one."""
        self.primary.kill()
        assert self.proxy is not None
        self.proxy.close()
        wait_for(lambda: self.primary_port() == self.replica.port, "Sentinel failover")
        wait_for(
            lambda: self.replica.client().info("replication")["role"] == "master",
            "the promoted replica",
        )

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for node in self.nodes:
            node.close()
