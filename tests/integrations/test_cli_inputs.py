"""Every ``shmcache`` subcommand against every kind of bad input (issue 12).

What a user may point the command at: a directory, a FIFO, an empty file, a random file, a
segment of another user, a symlink, a name that does not exist, what an older shmcache left
(its semaphore alone, or a segment of its layout beside its semaphore); bad numbers; a
closed or broken stdout. The answer is always one line on stderr and a non-zero status
(141 and silence for a reader that went away), never a traceback, and nothing behind the
name changes. The matrix runs ``main()`` in this process (it never raises, so
this is what a user sees); the stream cases need a real process and run one.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import _workers
import posix_ipc
import pytest

from shmcache import SharedMemorySessionCache
from shmcache.cli.main import main

NOBODY = pwd.getpwnam("nobody").pw_uid
TOKEN = "cli-inputs-token-7hQ2mX9vK4pL1sD8fG3jW6yE0rT5uI"

# Every subcommand that takes a segment name, with the arguments it needs.
COMMANDS: dict[str, list[str]] = {
    "stats": ["stats", "NAME"],
    "stats --json": ["stats", "NAME", "--json"],
    "reset": ["reset", "NAME", "--yes"],
    "revoke-user": ["revoke-user", "NAME", "7"],
    "purge": ["purge", "NAME"],
    "check": ["check", "NAME"],
    "unlock": ["unlock", "NAME"],
    "create": ["create", "NAME", "--capacity", "16"],
    "unlink": ["unlink", "NAME"],
}


def _write(data: bytes) -> Callable[[str, str], None]:
    def make(name: str, path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)

    return make


def _fifo(name: str, path: str) -> None:
    os.mkfifo(path, 0o600)


def _directory(name: str, path: str) -> None:
    os.mkdir(path, 0o700)


def _socket(name: str, path: str) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)


def _foreign_segment(name: str, path: str) -> None:
    """A whole, valid segment that belongs to nobody (65534): only ``--owner`` trusts it."""
    cache = SharedMemorySessionCache.create(name, capacity=16, value_size=64)
    cache.set(TOKEN, {"user": "somebody"}, 600, user_id=7)
    cache.close()
    os.chown(path, NOBODY, NOBODY)


def _symlink_to_live(name: str, path: str) -> None:
    """A symlink to a real segment of ours: following it would act on the target."""
    target = name + "-target"
    SharedMemorySessionCache.create(target, capacity=16).close()
    os.symlink(os.path.join(os.path.dirname(path), target), path)


def _old_semaphore_only(name: str, path: str) -> None:
    """The semaphore an older shmcache made beside NAME, left alone (its segment removed)."""
    posix_ipc.Semaphore("/" + name, posix_ipc.O_CREX).close()


def _old_layout(name: str, path: str) -> None:
    """A segment of layout 2 (the last that locked with the semaphore) and its semaphore."""
    SharedMemorySessionCache.create(name, capacity=16).close()
    with open(path, "r+b") as f:
        f.seek(8)
        f.write((2).to_bytes(4, "little"))  # the header's layout version
    _old_semaphore_only(name, path)


def _magic_only(name: str, path: str) -> None:
    _write(b"SHMCACHE" + bytes(8184))(name, path)


INPUTS: dict[str, Callable[[str, str], None] | None] = {
    "missing": None,
    "directory": _directory,
    "fifo": _fifo,
    "socket": _socket,
    "empty file": _write(b""),
    "random file": _write(os.urandom(20000)),
    "magic only": _magic_only,
    "old semaphore only": _old_semaphore_only,
    "old layout": _old_layout,
    "symlink": _symlink_to_live,
    "foreign segment": _foreign_segment,
}


def _snapshot(name: str) -> dict[str, Any]:
    """Everything a command could change behind ``name`` (and a symlink's target)."""
    out: dict[str, Any] = {}
    for n in (name, "sem." + name, name + "-target", "sem." + name + "-target"):
        path = f"/dev/shm/{n}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out[n] = None
            continue
        digest = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        out[n] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_uid, st.st_ino, digest)
    return out


@pytest.fixture
def odd(segment_name: str) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(kind: str) -> str:
        builder = INPUTS[kind]
        if kind == "foreign segment" and os.geteuid() != 0:
            pytest.skip("giving a segment to another user needs root (CI runs as root)")
        if builder is not None:
            builder(segment_name, f"/dev/shm/{segment_name}")
        made.append(segment_name)
        return segment_name

    yield make
    for n in (segment_name, segment_name + "-target"):
        for path in (f"/dev/shm/{n}", f"/dev/shm/sem.{n}"):
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            elif os.path.lexists(path):
                os.unlink(path)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    # A failure, not a hang, if a command blocks (the old `unlink` opened a FIFO to read
    # its magic, and waited forever for a writer).
    status = _workers.within(lambda: main(argv), timeout=60)
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status: int, out: str, err: str, command: str) -> None:
    assert status in (1, 2), (status, out, err)
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith(f"shmcache: {command}: "), err
    assert TOKEN not in out + err


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_every_odd_name_in_one_line(
    command: str, kind: str, odd: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = odd(kind)
    before = _snapshot(name)
    argv = [name if a == "NAME" else a for a in COMMANDS[command]]
    status, out, err = run_main(argv, capsys)
    if command == "create" and kind in ("missing", "old semaphore only"):
        assert status == 0, err  # no segment by that name: not a refusal
        return
    assert_refused(status, out, err, argv[0])
    assert _snapshot(name) == before, "a refused command changed what is behind the name"


def test_the_foreign_segment_is_usable_with_owner_only(
    odd: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = odd("foreign segment")
    status, out, err = run_main(["stats", name, "--json"], capsys)
    assert status == 1 and "--owner USER trusts another owner" in err
    assert "owner_uid" not in err  # the API's keyword is not the CLI's flag
    status, out, err = run_main(["stats", name, "--owner", "nobody"], capsys)
    assert status == 0 and "1 live" in out, err
    status, out, err = run_main(["unlink", name, "--force"], capsys)
    assert status == 1 and "--owner USER" in err and os.path.exists(f"/dev/shm/{name}")
    status, out, err = run_main(["unlink", name, "--owner", str(NOBODY)], capsys)
    assert status == 0, err
    assert not os.path.lexists(f"/dev/shm/{name}")
    assert not os.path.lexists(f"/dev/shm/sem.{name}")


@pytest.mark.parametrize(
    "kind", ["fifo", "socket", "empty file", "random file", "magic only", "old semaphore only",
             "old layout", "symlink"]
)
def test_unlink_force_removes_what_is_yours_and_only_the_name(
    kind: str, odd: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = odd(kind)
    status, _, err = run_main(["unlink", name, "--force"], capsys)
    assert status == 0, err
    assert not os.path.lexists(f"/dev/shm/{name}")
    assert not os.path.lexists(f"/dev/shm/sem.{name}")  # an older shmcache's leftover too
    if kind == "symlink":  # the link went, not what it pointed at
        assert os.path.exists(f"/dev/shm/{name}-target")


def test_unlink_force_leaves_a_directory(
    odd: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    name = odd("directory")
    status, out, err = run_main(["unlink", name, "--force"], capsys)
    assert_refused(status, out, err, "unlink")
    assert os.path.isdir(f"/dev/shm/{name}")


BAD_ARGUMENTS = [
    ["create", "NAME", "--capacity", "0"],
    ["create", "NAME", "--capacity", "-1"],
    ["create", "NAME", "--capacity", "ten"],
    ["create", "NAME", "--capacity", "1e3"],
    ["create", "NAME", "--capacity", "99999999999999999999999"],
    ["create", "NAME", "--capacity", "16", "--value-size", "-1"],
    ["create", "NAME", "--capacity", "16", "--value-size", "99999999999"],
    ["create", "NAME", "--capacity", "16", "--mode", "999"],
    ["create", "NAME", "--capacity", "16", "--mode", "rw"],
    ["create", "NAME", "--capacity", "16", "--mode", "1777"],
    ["create", "NAME", "--capacity", "16", "--mode", "400"],
    ["create", "NAME", "--capacity", "16", "--mode", "660"],
    ["create", "NAME", "--capacity", "16", "--mode", "777"],
    ["create", "NAME"],
    ["stats", "NAME", "--owner", "no-such-user-xyz"],
    ["stats", "NAME", "--owner", "-5"],
    ["revoke-user", "NAME"],
    ["revoke-user", "NAME", ""],
    ["stats", "bad/name"],
    ["stats", ""],
    ["stats", "x" * 300],
    ["stats", ".."],
    ["frobnicate"],
    [],
    ["stats"],
]


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda a: " ".join(a) or "nothing")
def test_bad_numbers_and_names_exit_2_without_traceback(
    argv: list[str], segment_name: str, make_name: Callable[[], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    new = make_name()  # removed after the test even if a bad create made it
    live = SharedMemorySessionCache.create(segment_name, capacity=16)  # for revoke-user
    try:
        args = [new if a == "NAME" and argv[0] == "create" else
                segment_name if a == "NAME" else a for a in argv]
        status, out, err = run_main(args, capsys)
        assert status == 2, (status, err)
        assert "Traceback" not in out + err and err.strip()
        assert not os.path.exists(f"/dev/shm/{new}")  # nothing created
    finally:
        live.close()


def test_create_with_a_writable_mode_needs_the_flag_and_then_works(
    segment_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run_main(
        ["create", segment_name, "--capacity", "16", "--mode", "660"], capsys
    )
    assert status == 2 and "--allow-writable-by-others" in err
    assert not os.path.exists(f"/dev/shm/{segment_name}")
    status, _, err = run_main(["create", segment_name, "--capacity", "16", "--mode", "660",
                                 "--allow-writable-by-others"], capsys)
    assert status == 0, err
    assert stat.S_IMODE(os.stat(f"/dev/shm/{segment_name}").st_mode) == 0o660
    status, _, err = run_main(["stats", segment_name], capsys)
    assert status == 1 and "--allow-writable-by-others accepts it" in err
    assert "allow_writable_by_others=True" not in err
    status, _, err = run_main(["stats", segment_name, "--allow-writable-by-others"], capsys)
    assert status == 0, err
    assert run_main(["unlink", segment_name], capsys)[0] == 0  # no flag needed to remove it


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from shmcache import __version__

    status, out, _ = run_main(["--version"], capsys)
    assert status == 0 and out == f"shmcache {__version__}\n"


# -- standard streams: these need a process of their own ---------------------------------


def shmcache(args: list[str], **popen: Any) -> subprocess.CompletedProcess[bytes]:
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "shmcache", *args], stdin=subprocess.DEVNULL,
                          timeout=120, check=False, **popen)


def _close_stdout() -> None:
    os.close(1)


STREAM_COMMANDS = [
    ["stats", "NAME"], ["stats", "NAME", "--json"], ["reset", "NAME", "--yes"],
    ["revoke-user", "NAME", "7"], ["purge", "NAME"], ["check", "NAME"], ["unlock", "NAME"],
    ["create", "NEW", "--capacity", "16"], ["unlink", "NAME"], ["list"], ["list", "--json"],
    ["demo"], ["--version"], ["--help"],
]


@pytest.fixture
def live(segment_name: str) -> Iterator[SharedMemorySessionCache]:
    cache = SharedMemorySessionCache.create(segment_name, capacity=64, value_size=64)
    cache.set(TOKEN, {"user": "alice"}, 600, user_id=7)
    yield cache
    cache.close()


def _argv(args: list[str], name: str, new: str = "") -> list[str]:
    return [name if a == "NAME" else new if a == "NEW" else a for a in args]


@pytest.mark.parametrize("args", STREAM_COMMANDS, ids=" ".join)
def test_a_closed_stdout_is_refused_before_anything_changes(
    args: list[str], live: SharedMemorySessionCache, make_name: Callable[[], str]
) -> None:
    new = make_name()
    result = shmcache(_argv(args, live.name, new), stdout=None, preexec_fn=_close_stdout)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err == ("shmcache: standard output is closed: refusing to run (nothing could "
                   "report what was done)\n")
    assert live.get(TOKEN) == {"user": "alice"}  # not reset, revoked or unlinked
    assert os.path.exists(f"/dev/shm/{live.name}")
    assert not os.path.exists(f"/dev/shm/{new}")


@pytest.mark.parametrize(
    "args",
    [a for a in STREAM_COMMANDS if a[0] not in ("demo", "unlink", "create", "reset")],
    ids=" ".join,
)
def test_a_reader_that_goes_away_ends_the_command_quietly(
    args: list[str], live: SharedMemorySessionCache
) -> None:
    """``shmcache list --json | head -5``: status 141 (as a shell shows SIGPIPE), no output."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        result = shmcache(_argv(args, live.name), stdout=write_end)
    finally:
        os.close(write_end)
    # argparse itself swallows a failed write of --help/--version (exit 0, as quiet); under
    # PYTHONUNBUFFERED that is the write, otherwise our final flush fails (141).
    quiet = (0, 141) if args[0].startswith("--") else (128 + signal.SIGPIPE,)
    assert result.returncode in quiet, result.stderr
    assert result.stderr == b""


def test_head_reads_a_few_lines_and_the_command_ends_quietly(
    live: SharedMemorySessionCache, make_name: Callable[[], str]
) -> None:
    for _ in range(150):  # enough output to fill the pipe after head has gone
        SharedMemorySessionCache.create(make_name(), capacity=1).close()
    result = subprocess.run(
        f"{sys.executable} -m shmcache list --json | head -5; echo \"${{PIPESTATUS[0]}}\"",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and lines[-1] in ("0", "141"), result.stdout
    assert result.stderr == ""


def test_a_full_disk_on_stdout_is_one_line(live: SharedMemorySessionCache) -> None:
    with open("/dev/full", "wb") as full:
        result = shmcache(["stats", live.name, "--json"], stdout=full)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert "No space left on device" in err and "Traceback" not in err


def test_a_closed_stderr_is_quiet_and_keeps_the_status(live: SharedMemorySessionCache) -> None:
    result = shmcache(["stats", "no-such-segment-for-shmcache"], stdout=subprocess.PIPE,
                      stderr=None, preexec_fn=lambda: os.close(2))
    assert result.returncode == 1 and result.stdout == b""


def test_reset_with_stdin_closed_asks_for_yes(live: SharedMemorySessionCache) -> None:
    result = subprocess.run([sys.executable, "-m", "shmcache", "reset", live.name],
                            capture_output=True, text=True, timeout=120,
                            preexec_fn=lambda: os.close(0))
    assert result.returncode == 2 and "--yes" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert live.get(TOKEN) is not None


def test_demo_without_gunicorn_says_what_to_install() -> None:
    code = ("import sys; sys.modules['gunicorn'] = None\n"
            "from shmcache.cli.main import main; sys.exit(main(['demo']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr == ("shmcache: demo: the demo runs a real gunicorn, which is not "
                             "installed: pip install 'shmcache[gunicorn]'\n")


def test_no_subcommand_is_left_out() -> None:
    """A new subcommand must join the matrix above."""
    from shmcache.cli.main import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    assert set(sub.choices) == {c.split()[0] for c in COMMANDS} | {"list", "demo"}
