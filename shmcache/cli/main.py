"""The ``shmcache`` command (also ``python -m shmcache``): demo and administration.

Every command is safe against a live server: attaching and exiting never removes or damages
a segment (posix_ipc has no resource tracker), reads take no lock, and writes take the same
lock the workers take. Errors are one line on stderr and a non-zero exit, never a traceback,
and no command ever prints a token or a session. Exit status: 0 done, 1 refused or failed,
2 bad usage, 130 interrupted, 141 the reader of stdout went away (``| head``).

Integration layer. Here: the parser and the commands that attach; ``names.py``: create,
unlink, list; ``stdio.py``: closed and broken standard streams; ``common.py``: refusals.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pwd
import sys
import time
from collections.abc import Callable, Sequence

from .. import __version__
from .._errors import InvalidArgument, ShmCacheError
from ..codecs import JsonCodec
from ..shm import segment as _segment
from ..shm.cache import SharedMemorySessionCache
from ..shm.layout import MAX_CAPACITY, MAX_VALUE_SIZE
from ..sql import admin as _sql_admin
from . import stdio
from .common import CommandError, for_cli
from .names import cmd_create, cmd_list, cmd_unlink


def _owner(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {value!r}") from None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}: {value}")
        return number

    return parse


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not permission bits: {value!r}")
    return mode


def _attach(args: argparse.Namespace) -> SharedMemorySessionCache:
    # Admin commands never decode a value; naming a codec keeps the default-pickle refusal
    # (for segments others can write) from refusing a look at them.
    return SharedMemorySessionCache.attach(
        args.name, owner_uid=args.owner, allow_writable_by_others=args.allow_writable_by_others,
        codec=JsonCodec(),
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"


def _implementation(used: str | None) -> str:
    """Which code runs get/set/invalidate here (and in workers of this installation that
    have the same environment): the compiled core or pure Python, and why."""
    from ..shm import fast

    if used == "c":
        return f"c (the compiled core; {fast.ENV}=1 selects pure Python)"
    if fast.pure_python_forced():
        return f"python ({fast.ENV} is set)"
    return f"python ({fast.UNAVAILABLE or 'pure Python'})"


def cmd_stats(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        stats = cache.stats()
    stats["age_seconds"] = round(time.time() - stats["created"], 3)
    stats.pop("tombstones", None)  # always 0: a removal zeroes its slot (README, "Capacity")
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    lookups = stats["hits"] + stats["misses"]
    rate = f" (hit rate {100 * stats['hits'] / lookups:.1f}%)" if lookups else ""
    owner = stats["lock_owner"]
    if stats["lock_abandoned"]:
        owner_text = "abandoned by a dead holder (the next write recovers it; or `shmcache unlock`)"
    else:
        owner_text = "free" if owner is None else f"held by pid {owner} (alive)"
    rows = [
        ("segment", f"{stats['name']} ({_segment.segment_path(stats['name'])}, "
                    f"{stats['size_bytes']} bytes, {stats['committed_bytes']} in use)"),
        ("capacity", f"{stats['capacity']} sessions ({stats['slots']} slots, window "
                     f"{stats['window']}, value size {stats['value_size']})"),
        ("entries", f"{stats['entries']} live, {stats['expired']} expired, "
                    f"{stats['invalid']} invalid"),
        ("load factor", f"{stats['load_factor']:.4f}"),
        ("hits / misses", f"{stats['hits']} / {stats['misses']}{rate}, "
                          f"{stats['processes']} processes"),
        ("evictions", str(stats["evictions"])),
        ("oversize values", str(stats["oversize"])),
        ("values", f"{stats['value_bytes']} bytes in the arena ("
                   f"{stats['arena_committed_bytes']} of {stats['arena_bytes']} reserved), "
                   f"{stats['arena_full']} not stored for lack of room"),
        ("lease drops", str(stats["lease_drops"])),
        ("lock recoveries", str(stats["lock_recoveries"])),
        ("lock owner", owner_text),
        ("creator pid", f"{stats['creator_pid']} (keeper {stats['keeper_pid']})"),
        ("age", _age(stats["age_seconds"])),
        ("implementation", _implementation(stats.get("implementation"))),
    ]
    for label, value in rows:
        print(f"{label:<16} {value}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        live = cache.stats()["entries"]
        if not args.yes:
            if sys.stdin is None or not sys.stdin.isatty():
                raise CommandError("refusing to reset without --yes (stdin is not a terminal)", 2)
            try:
                answer = input(
                    f"Drop all {live} live sessions in {cache.name!r}? Every user must log "
                    "in again. [y/N] "
                )
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print("not reset")
                return 1
        cache.clear()
    print(f"reset {args.name}: dropped {live} live sessions")
    return 0


def cmd_revoke_user(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        dropped = cache.invalidate_by_user(args.user_id)
    print(f"revoked user {args.user_id!r} in {args.name}: dropped {dropped} live sessions")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        count = cache.purge()
    print(f"purged {count} expired or damaged entries from {args.name}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        problems = cache.check()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.name}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{args.name}: ok")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        stats = cache.stats()
        owner = stats["lock_owner"]
        if cache.recover_lock():
            print(f"{args.name}: recovered the lock from a dead holder")
            return 0
        if owner is None:
            print(f"{args.name}: the lock is free")
            return 0
        raise CommandError(f"the lock is held by live process {owner}: not touching it")


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        importlib.import_module("gunicorn")
    except ImportError:
        raise CommandError(
            "the demo runs a real gunicorn, which is not installed: "
            "pip install 'shmcache[gunicorn]'"
        ) from None
    from . import demo

    try:
        return demo.run()
    except RuntimeError as exc:  # gunicorn did not start or answer: the demo says why
        raise CommandError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache", description="Shared-memory session cache: demo and administration."
    )
    parser.add_argument("--version", action="version", version=f"shmcache {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace], int],
                *, segment: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        if segment:
            p.add_argument("name", metavar="NAME", help="segment name, as in /dev/shm/NAME, "
                           "or a database URL (stats, reset, revoke-user, purge, check)")
        return p

    def owner_flag(p: argparse.ArgumentParser, help_text: str) -> None:
        p.add_argument("--owner", type=_owner, default=None, metavar="USER", help=help_text)

    attach_commands = []
    p = command("stats", "figures of a segment", cmd_stats)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    attach_commands.append(p)
    p = command("reset", "drop every session at once (every user logs in again)", cmd_reset)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    attach_commands.append(p)
    p = command("revoke-user", "drop every session of one user (log out all devices)",
                cmd_revoke_user)
    p.add_argument("user_id", metavar="USER_ID", help="as the app passes it (compared as text)")
    attach_commands.append(p)
    attach_commands.append(command("purge", "reclaim expired entries now", cmd_purge))
    attach_commands.append(
        command("check", "integrity check; exit status 1 if problems are found", cmd_check)
    )
    attach_commands.append(
        command("unlock", "recover the lock from a dead holder (never a live one)", cmd_unlock)
    )
    for p in attach_commands:
        owner_flag(p, "trust a segment owned by this user or uid (default: yourself)")
        p.add_argument("--allow-writable-by-others", action="store_true",
                       help="accept a segment that group or others may write")
    p = command("create", "create a segment (it stays until `shmcache unlink`)", cmd_create)
    p.add_argument("--capacity", type=_int_between(1, MAX_CAPACITY), required=True,
                   metavar="N", help="sessions it holds")
    p.add_argument("--value-size", type=_int_between(0, MAX_VALUE_SIZE), default=0,
                   metavar="N", help="bytes of encoded session kept per entry (default 0)")
    p.add_argument("--mode", type=_mode, default=0o600,
                   help="octal permission bits of the segment (default 600)")
    p.add_argument("--allow-writable-by-others", action="store_true",
                   help="allow a --mode that lets group or others write it")
    p = command("unlink", "remove a segment's name (attached processes keep it)", cmd_unlink)
    owner_flag(p, "remove a segment owned by this user or uid (default: yourself)")
    p.add_argument("--force", action="store_true",
                   help="remove it even if it is not a whole shmcache segment")
    p = command("list", "the shmcache segments on this host", cmd_list, segment=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    command("demo", "watch a logout in one worker reach the others", cmd_demo, segment=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (0 done, 1 refused or failed, 2 bad usage, 130
    interrupted, 141 the reader of stdout went away). Never raises, never a traceback."""
    stdio.fill_closed_descriptors()
    if stdio.stdout_is_closed():
        stdio.error("shmcache: standard output is closed: refusing to run (nothing could "
                    "report what was done)")
        return 1
    command = "shmcache"
    try:
        args = _parser().parse_args(argv)  # --help, --version, usage errors: SystemExit
        command = args.command
        if _sql_admin.is_url(getattr(args, "name", None)):  # a database (issue 14)
            status = _sql_admin.run(args)
        else:
            status = int(args.fn(args))
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except BrokenPipeError:
        stdio.discard_stdout()
        return stdio.SIGPIPE_STATUS
    except CommandError as exc:
        stdio.error(f"shmcache: {command}: {exc}")
        status = exc.code
    except (ShmCacheError, OSError) as exc:
        stdio.error(f"shmcache: {command}: {for_cli(str(exc))}")
        status = 2 if isinstance(exc, InvalidArgument) else 1
    except KeyboardInterrupt:
        stdio.error("shmcache: interrupted")
        status = 130
    except Exception as exc:  # a bug of ours: still one line, naming what went wrong
        stdio.error(f"shmcache: {command}: unexpected {type(exc).__name__}: {exc} "
                    "(please report it)")
        status = 1
    failed_write = stdio.flush_stdout()
    return status if failed_write is None else failed_write


if __name__ == "__main__":  # pragma: no cover - python -m shmcache.cli.main
    sys.exit(main())
