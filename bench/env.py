"""The machine and software a run measured, recorded in the JSON beside every figure."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGES = (
    "shmcache", "posix_ipc", "xxhash", "lmdb", "diskcache", "redis", "gunicorn",
    "matplotlib", "numpy", "fastapi", "pydantic", "uvicorn", "uvicorn-worker",
)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version_of(binary: str, *args: str) -> str | None:
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else None


def _git(root: Path) -> dict[str, Any]:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "shmcache"], cwd=root,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    # "dirty" looks at shmcache/ only: the figures describe the core, not bench/ edits.
    return {"commit": head or None, "core_modified": bool(dirty)}


def environment(root: Path) -> dict[str, Any]:
    packages: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": packages,
        "redis_server": _version_of("redis-server", "--version"),
        "wrk": _version_of("wrk", "--version"),
        "git": _git(root),
    }


def cpu_times() -> list[int]:
    """The machine's cumulative CPU jiffies (user nice system idle iowait irq softirq steal)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return []
    return [int(x) for x in first[1:9]]


def load_during(before: list[int], after: list[int], seconds: float) -> dict[str, Any]:
    """How busy the machine was while a section ran (ours and everybody else's work), and
    how much time the hypervisor stole: figures to read the section's numbers against."""
    if not before or not after:
        return {}
    d = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(d) or 1
    return {
        "seconds": seconds,
        "busy": (total - d[3] - d[4]) / total,
        "steal": d[7] / total,
        "load_average_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
