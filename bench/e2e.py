"""End to end: gunicorn (4 sync workers) serving ``bench.wsgi_app`` with each cache.

All servers are started first, then loaded in interleaved rounds (a VM's slow minute hits
every backend), by wrk if installed (one thread, 8 connections, on loopback) or else by
``bench.httpclient``. Each round starts with an unmeasured warm-up, so the caches hold
the token pool when the measured run begins.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import httpclient
from .auth import sign
from .backends import VALUE_SIZE, Backend, Resources, segment_name
from .config import Config
from .progress import Progress
from .redis_server import free_port
from .stats import ratio

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENS = 500  # distinct users hitting the endpoint (every worker sees each in the warm-up)
WORKERS = 4


class Gunicorn:
    """gunicorn with ``bench/gunicorn_conf.py`` on a free loopback port, the repository on
    ``PYTHONPATH``, its output in ``log``; ``stop`` shuts it down gracefully."""

    def __init__(self, app: str, env: dict[str, str], log: Path,
                 worker_class: str | None = None, workers: int = WORKERS) -> None:
        self.port = free_port()
        self.log = log
        self.expected = workers
        full = dict(os.environ)
        full.update(env)
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(HERE / "gunicorn_conf.py"),
               "-w", str(workers), "-b", f"127.0.0.1:{self.port}"]
        if worker_class:
            cmd += ["-k", worker_class]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([*cmd, app], cwd=ROOT, env=full, stdout=out,
                                         stderr=subprocess.STDOUT)

    def workers(self, timeout: float = 30.0) -> dict[int, dict[str, int]]:
        """Each worker's /health answer (pid, hits, misses), asking until every worker has
        answered once (gunicorn hands each connection to whichever worker accepts it)."""
        seen: dict[int, dict[str, int]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(seen) < self.expected:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                            timeout=2) as r:
                    answer = json.loads(r.read())
                seen.setdefault(answer["pid"], answer)
                continue
            time.sleep(0.1)
        if not seen:
            raise RuntimeError(f"gunicorn never answered: {self.log.read_text()[-2000:]}")
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: on_exit unlinks the segment
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Server(Gunicorn):
    def __init__(self, key: str, res: Resources, secret: str) -> None:
        self.key = key
        env = {"BENCH_BACKEND": key, "BENCH_SECRET": secret}
        if key.startswith("shm"):
            env.update({
                "SHMCACHE_NAME": segment_name("e2e"),
                "SHMCACHE_CAPACITY": "65536",
                "SHMCACHE_VALUE_SIZE": str(VALUE_SIZE if key == "shm-value" else 0),
            })
        if key == "redis":
            env["BENCH_REDIS_PORT"] = str(res.redis_port())
        super().__init__("bench.wsgi_app:app", env, Path(res.tmpdir) / f"gunicorn-{key}.log")

    def hit_rate(self) -> float:
        counts = self.workers(timeout=5).values()
        hits = sum(c["hits"] for c in counts)
        return ratio(hits, hits + sum(c["misses"] for c in counts))


def wrk(port: int, token_file: Path, seconds: float, connections: int = 8,
        close: bool = False) -> dict[str, Any]:
    """wrk (one thread) on ``GET /me`` with a random token of ``token_file`` per request;
    ``close`` sends ``Connection: close`` (a new connection per request, so the kernel
    spreads them over the workers). The figures of ``bench/wrk_report.lua``."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
         "-s", str(HERE / "wrk_report.lua"), f"http://127.0.0.1:{port}/me",
         "--", str(token_file), "close" if close else "keepalive"],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            result: dict[str, Any] = json.loads(line[8:])
            return result
    raise RuntimeError(f"wrk gave no figures: {out.stdout[-500:]} {out.stderr[-500:]}")


def run(cfg: Config, backends: list[Backend], res: Resources, progress: Progress) -> dict[str, Any]:
    keys = [b.key for b in backends if b.key in cfg.e2e_backends]
    labels = {b.key: b.label for b in backends}
    use_wrk = shutil.which("wrk") is not None
    if not use_wrk:
        progress.note("wrk not installed (apt-get install wrk): using the Python client")
    secret = secrets.token_hex(16)
    token_file = Path(res.tmpdir) / "tokens.txt"
    pool = [sign(secrets.token_urlsafe(24), secret.encode()) for _ in range(TOKENS)]
    token_file.write_text("\n".join(pool) + "\n")

    servers: dict[str, _Server] = {}
    rows: dict[str, Any] = {}
    try:
        for key in keys:
            progress.step(f"starting gunicorn ({WORKERS} workers) with {labels[key]}")
            try:
                servers[key] = _Server(key, res, secret)
                servers[key].workers()
            except Exception as exc:  # e.g. redis would not start: say so, go on
                progress.note(f"skipped end-to-end {labels[key]}: {exc}")
                rows[key] = {"label": labels[key], "skipped": str(exc)}
                servers.pop(key, None)
        # Several short rounds, each backend in turn: the VM's drift shows up as a spread of
        # per-round ratios instead of as a bias against whoever ran in a slow minute.
        rounds = 4 if cfg.name == "full" else 1
        per_round = cfg.e2e_seconds / rounds
        warm = 2.0 if cfg.name == "full" else 1.0
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
        hit_rates: dict[str, float] = {}
        for r in range(rounds):
            for key, server in servers.items():
                progress.step(f"round {r + 1}/{rounds}: {labels[key]}")
                if use_wrk:
                    if r == 0:  # unmeasured: fill every worker's view; servers stay up
                        wrk(server.port, token_file, warm)
                    runs[key].append(wrk(server.port, token_file, per_round))
                else:
                    if r == 0:
                        httpclient.load(server.port, pool, warm)
                    runs[key].append(httpclient.load(server.port, pool, per_round))
        for key, server in servers.items():
            hit_rates[key] = server.hit_rate()
    finally:
        for server in servers.values():
            server.stop()
    for key, results in runs.items():
        requests = sum(x["requests"] for x in results)
        seconds = sum(x["duration_us"] for x in results) / 1e6
        lat = {p: sum(x["latency_us"][p] for x in results) / len(results)
               for p in ("p50", "p99", "p999")}
        rows[key] = {
            "label": labels[key], "rps": requests / seconds, "requests": requests,
            "latency_us": lat, "rounds": results,
            "errors": sum(sum(x["errors"].values()) for x in results),
            # from the workers that answered /health: every one, unless one was busy
            "hit_rate": hit_rates.get(key, float("nan")),
        }
    base = rows.get("inmemory", {})
    for row in rows.values():
        if "rps" in row and "rps" in base:
            row["rps_ratio_total"] = ratio(row["rps"], base["rps"])
            # Paired by round (the two ran seconds apart), then the median over rounds.
            paired = [ratio(a["requests"] / a["duration_us"], b["requests"] / b["duration_us"])
                      for a, b in zip(row["rounds"], base["rounds"], strict=True)]
            row["rps_ratio_rounds"] = paired
            row["rps_ratio"] = statistics.median(paired)
    return {
        "server": f"gunicorn {WORKERS} sync workers, bench.wsgi_app (GET /me, bearer token)",
        "client": "wrk -t1 -c8" if use_wrk else "bench.httpclient (2 processes x 4 threads)",
        "tokens": TOKENS,
        "seconds_per_backend": cfg.e2e_seconds,
        "ratio": "median over rounds of (requests/s / in-memory's in the same round)",
        "backends": rows,
    }
