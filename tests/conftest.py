"""Shared fixtures (unique segment names, cleaned up even when a test fails) and the suite's
rules: under CI a skip is a failure, and a missing package says how to install it."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterator

import _redis_support
import posix_ipc
import pytest
from _clock import FakeClock
from _redis_support import (  # noqa: F401  (fixtures of the Redis tests, offered to all)
    own_redis,
    redis_prefix,
    redis_raw,
    redis_server,
)
from sql._pg_support import own_pg, pg_server, pg_table, sqlite_file  # noqa: F401  (fixtures)

from shmcache import SharedMemorySessionCache


def _unlink(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        posix_ipc.unlink_shared_memory("/" + name)
    # What tests of an older shmcache's leftover plant beside the segment (a file or a link).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/sem.{name}")


@pytest.fixture
def segment_name() -> Iterator[str]:
    """A fresh name (nothing in /dev/shm yet); removed after the test."""
    name = f"shmcache-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    _unlink(name)


@pytest.fixture
def make_name() -> Iterator[Callable[[], str]]:
    """Factory of fresh names, for tests that need several segments."""
    names: list[str] = []

    def make() -> str:
        name = f"shmcache-test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    yield make
    for name in names:
        _unlink(name)


INSTALL_HINT = "pip install -e '.[test]' installs every test dependency"
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


def _missing_module_hint(report: pytest.TestReport | pytest.CollectReport) -> None:
    """A test (or test module) that fails for want of a package says how to install it."""
    found = _MISSING.search(str(report.longrepr)) if report.failed else None
    if found:
        report.longrepr = f"{found[1]} is not installed: {INSTALL_HINT}\n\n{report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI every test must run: a skip there is a failure that gives the skip's reason
    (the README promises 0 skipped; a missing server or package must not hide a test)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {reason}"
    _missing_module_hint(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _missing_module_hint(outcome.get_result())  # type: ignore[attr-defined]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _redis_support.stop_shared_server()  # if a test started it


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shm_cache(segment_name: str, clock: FakeClock) -> Iterator[SharedMemorySessionCache]:
    cache = SharedMemorySessionCache.create(segment_name, capacity=1024, clock=clock)
    yield cache
    cache.close()
