"""A Python load generator for when wrk is not installed: forked processes, each with a few
threads sending ``GET /me`` over fresh loopback connections (gunicorn's sync workers close
the connection after every response, as they do for wrk too), or with ``keepalive`` over
one persistent connection per thread."""

from __future__ import annotations

import http.client
import multiprocessing
import random
import socket
import threading
import time
from array import array
from typing import Any

from .stats import summary


def _one(port: int, token: str) -> int:
    """The response's status code (0: no parsable response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"GET /me HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b" ", 2)
    return int(head[1]) if len(head) > 1 and head[1].isdigit() else 0


class _KeepAlive:
    """One persistent HTTP/1.1 connection, reopened after any failure."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._conn: http.client.HTTPConnection | None = None

    def __call__(self, port: int, token: str) -> int:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)
        try:
            self._conn.request("GET", "/me", headers={"Authorization": f"Bearer {token}"})
            response = self._conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = None
            return 0
        if response.will_close:
            self._conn.close()
            self._conn = None
        return response.status


def _process(port: int, tokens: list[str], seconds: float, threads: int, conn: Any,
             keepalive: bool) -> None:
    lat = array("q")
    errors = {"status": 0, "socket": 0}  # like wrk's: a non-2xx answer, no answer
    guard = threading.Lock()
    deadline = time.perf_counter() + seconds

    def loop(seed: int) -> None:
        rng = random.Random(seed)
        send = _KeepAlive(port) if keepalive else _one
        mine = array("q")
        bad_status = bad_socket = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            try:
                status = send(port, tokens[rng.randrange(len(tokens))])
            except OSError:
                status = 0
            mine.append(time.perf_counter_ns() - t0)
            bad_socket += status == 0
            bad_status += not (status == 0 or 200 <= status < 300)
        with guard:
            lat.extend(mine)
            errors["status"] += bad_status
            errors["socket"] += bad_socket

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    conn.send({"elapsed": time.perf_counter() - t0, "errors": errors, "lat": lat.tobytes()})
    conn.close()


def load(port: int, tokens: list[str], seconds: float, procs: int = 2,
         threads: int = 4, keepalive: bool = False) -> dict[str, Any]:
    """Figures in the same shape as the wrk script's."""
    ctx = multiprocessing.get_context("fork")
    pipes, ps = [], []
    for _ in range(procs):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_process, args=(port, tokens, seconds, threads, child, keepalive))
        p.start()
        child.close()
        pipes.append(parent)
        ps.append(p)
    lat = array("q")
    errors = {"status": 0, "socket": 0}
    elapsed = 0.0
    for parent in pipes:
        out = parent.recv()
        a = array("q")
        a.frombytes(out["lat"])
        lat.extend(a)
        for k, v in out["errors"].items():
            errors[k] += v
        elapsed = max(elapsed, out["elapsed"])
    for p in ps:
        p.join()
    s = summary([x / 1000 for x in lat])
    return {
        "requests": len(lat),
        "duration_us": int(elapsed * 1e6),
        "errors": errors,
        "latency_us": {"mean": s["mean"], "p50": s["median"], "p99": s["p99"],
                       "p999": s["p999"]},
    }
