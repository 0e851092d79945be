"""The package's own promises about itself: strict typing and a clean lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_mypy_strict_is_clean() -> None:
    result = _run("mypy", "--strict", "shmcache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_is_sorted_and_complete() -> None:
    import shmcache

    assert list(shmcache.__all__) == sorted(shmcache.__all__)
    for name in ("SessionCache", "InMemorySessionCache", "NoOpSessionCache",
                 "SharedMemorySessionCache", "ShmCacheError"):
        assert name in shmcache.__all__
        assert hasattr(shmcache, name)
    assert (ROOT / "shmcache" / "py.typed").is_file()
