"""A throwaway PostgreSQL server for the database rows (unix socket only, dies with the run).

The binaries: ``pg_ctl``'s directory on PATH, else the newest ``/usr/lib/postgresql/*/bin``,
else the ``pgserver`` wheel (``pip install -e '.[bench]'``). As root, the server runs as
``nobody`` (PostgreSQL refuses root). Durability settings are PostgreSQL's defaults
(``fsync=on``, ``synchronous_commit=on``), so the figures are what a real server costs;
the session table is UNLOGGED, as ``DatabaseSessionCache`` makes it by default.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PORT = 5432  # names the socket file only: no TCP port is opened


def find_bindir() -> str | None:
    def has_server(d: str) -> bool:
        return all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "postgres"))

    candidates = []
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(os.path.dirname(os.path.realpath(pg_ctl)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True,
                         key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        candidates.append(str(Path(spec.origin).parent / "pginstall" / "bin"))
    return next((c for c in candidates if has_server(c)), None)


class PostgresServer:
    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, "pg")
        self._proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @staticmethod
    def missing() -> str | None:
        if importlib.util.find_spec("psycopg") is None:
            return "python package 'psycopg' not installed (pip install -e '.[bench]')"
        if find_bindir() is None:
            return ("no PostgreSQL binaries (apt-get install postgresql, or "
                    "pip install -e '.[bench]' for the pgserver wheel)")
        return None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={PORT}"

    def start(self, timeout: float = 60.0) -> None:
        import psycopg

        bindir = find_bindir()
        assert bindir is not None
        uid = None
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            import pwd

            uid = pwd.getpwnam("nobody").pw_uid
            os.chown(self.dir, uid, -1)
        data = os.path.join(self.dir, "data")
        subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, user=uid, timeout=timeout)
        with open(os.path.join(self.dir, "postgres.log"), "ab") as log:
            self._proc = subprocess.Popen(
                [os.path.join(bindir, "postgres"), "-D", data, "-k", self.dir,
                 "-p", str(PORT), "-c", "listen_addresses=", "-c", "max_connections=200"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, user=uid,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited with status {self._proc.returncode}")
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    self.version = str(conn.execute("SHOW server_version").fetchone()[0])
                return
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("postgres did not accept connections in time")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
