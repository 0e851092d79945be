"""``shmcache demo``: a real gunicorn with 4 workers, one logout, the seed's cache vs ours.

It serves ``shmcache.cli.demo_app`` on a loopback port, logs a user in, spreads requests over
every worker (so each worker has validated and cached the session), logs out through one
worker, and counts how many later requests are still accepted: some with the seed's
per-process ``InMemorySessionCache``, none with shmcache. Then it runs ``shmcache reset``
against the live server and shows that every cached session is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

WORKERS = 4


@dataclass
class Server:
    """A gunicorn serving the demo app, and a minimal HTTP client for it."""

    port: int
    name: str
    process: subprocess.Popen[bytes]
    workdir: str
    seen: set[int] = field(default_factory=set)

    def request(self, method: str, path: str, token: str = "") -> tuple[int, dict[str, Any]]:
        # A new connection per request: gunicorn hands each one to whichever worker
        # accepts it first, which is how requests of one user reach different workers.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {"text": raw.decode(errors="replace")}
        finally:
            conn.close()
        if "worker" in body:
            self.seen.add(body["worker"])
        return response.status, body

    def until_every_worker(self, token: str, workers: int = WORKERS, limit: int = 2000) -> int:
        """GET /me until every worker has answered; returns how many requests it took."""
        seen: set[int] = set()
        for n in range(1, limit + 1):
            _, body = self.request("GET", "/me", token)
            seen.add(body["worker"])
            if len(seen) >= workers:
                return n
        raise RuntimeError(f"only {len(seen)} of {workers} workers answered in {limit} requests")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(workdir: str, port: int, name: str, *, workers: int = WORKERS,
                 preload: bool = False, extra: str = "") -> str:
    path = os.path.join(workdir, "gunicorn.conf.py")
    with open(path, "w") as f:
        f.write(
            "from shmcache.gunicorn import child_exit, configure, on_exit, on_starting  # noqa\n"
            f"configure(name={name!r}, capacity=4096, value_size=256)\n"
            f"bind = '127.0.0.1:{port}'\nworkers = {workers}\npreload_app = {preload!r}\n"
            "graceful_timeout = 5\nloglevel = 'warning'\n" + extra
        )
    return path


@contextmanager
def serve(backend: str, *, workers: int = WORKERS, preload: bool = False,
          app: str = "shmcache.cli.demo_app:app", extra_config: str = "",
          env: dict[str, str] | None = None) -> Iterator[Server]:
    """Run gunicorn on a free loopback port until the block ends, then stop it (SIGTERM)."""
    workdir = tempfile.mkdtemp(prefix="shmcache-demo-")
    port = free_port()
    name = f"shmcache-demo-{os.getpid()}-{port}"
    config = write_config(workdir, port, name, workers=workers, preload=preload,
                          extra=extra_config)
    child_env = {**os.environ, "SHMCACHE_DEMO_BACKEND": backend,
                 "SHMCACHE_DEMO_DB": os.path.join(workdir, "sessions.db"), **(env or {})}
    child_env.pop("SHMCACHE_NAME", None)
    log = open(os.path.join(workdir, "gunicorn.log"), "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", config, app],
        cwd=workdir, env=child_env, stdout=log, stderr=subprocess.STDOUT,
    )
    server = Server(port, name, process, workdir)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            with open(os.path.join(server.workdir, "gunicorn.log"), "rb") as f:
                lines = f.read()[-2000:].decode(errors="replace").strip().splitlines()
            last = lines[-1].strip() if lines else "no output"
            raise RuntimeError(f"gunicorn exited with {server.process.returncode}: {last}")
        try:
            server.request("GET", "/health")
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"gunicorn did not answer on port {server.port} within {timeout} s")


def logout_scenario(
    server: Server, after: int = 40, workers: int = WORKERS, limit: int = 2000
) -> dict[str, int]:
    """Log in, reach every worker, log out once, then count requests still accepted.

    After the logout it sends at least ``after`` requests, and more until every worker has
    answered one: the kernel may hand a run of connections to the same worker, and the
    question is what *every* worker says.
    """
    token = server.request("POST", "/login")[1]["token"]
    warmup = server.until_every_worker(token)
    server.request("POST", "/logout", token)
    statuses: list[int] = []
    answered: set[int] = set()
    while len(statuses) < after or (len(answered) < workers and len(statuses) < limit):
        status, body = server.request("GET", "/me", token)
        statuses.append(status)
        answered.add(body["worker"])
    return {
        "warmup_requests": warmup,
        "requests_after_logout": len(statuses),
        "workers_after_logout": len(answered),
        "accepted": statuses.count(200),
    }


def reset_scenario(server: Server, users: int = 5) -> dict[str, int]:
    """Cache several sessions, run `shmcache reset` against the live server, look again."""
    tokens = [server.request("POST", "/login")[1]["token"] for _ in range(users)]
    for token in tokens:
        server.request("GET", "/me", token)  # validated against the database and cached
    before = sum(bool(server.request("GET", "/me", t)[1].get("cached")) for t in tokens)
    result = subprocess.run(
        [sys.executable, "-m", "shmcache", "reset", server.name, "--yes"],
        capture_output=True, text=True, timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"shmcache reset failed: {result.stderr.strip()}")
    after = sum(bool(server.request("GET", "/me", t)[1].get("cached")) for t in tokens)
    return {"users": users, "cached_before_reset": before, "cached_after_reset": after}


def run() -> int:
    print(f"Starting gunicorn with {WORKERS} workers on 127.0.0.1, once per cache...\n")
    results = {}
    for backend, label in (("memory", "InMemorySessionCache (the seed)"),
                           ("shm", "SharedMemorySessionCache")):
        with serve(backend) as server:
            results[label] = logout_scenario(server)
            if backend == "shm":
                reset = reset_scenario(server)
    width = max(len(label) for label in results)
    print(f"{'cache':<{width}}  requests after logout  still accepted")
    for label, r in results.items():
        print(f"{label:<{width}}  {r['requests_after_logout']:>21}  {r['accepted']:>14}")
    print(f"\n`shmcache reset` on the live server: {reset['cached_before_reset']} of "
          f"{reset['users']} sessions served from the cache before, "
          f"{reset['cached_after_reset']} after (every one is gone from the cache).")
    stale = results["InMemorySessionCache (the seed)"]["accepted"]
    fixed = results["SharedMemorySessionCache"]["accepted"] == 0
    print()
    if stale:
        print(f"The seed's per-process cache accepted {stale} requests after the logout: the "
              "workers that did not handle it still had the session.")
    if fixed:
        print("shmcache: the logout handled by one worker was seen by all of them.")
    return 0 if fixed and reset["cached_after_reset"] == 0 else 1
