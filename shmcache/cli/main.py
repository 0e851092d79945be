"""The ``shmcache`` command (also ``python -m shmcache``): demo and administration.

Every command is safe against a live server: attaching and exiting never removes or damages
a segment (posix_ipc has no resource tracker), reads take no lock, and writes take the same
lock the workers take. Errors are one line on stderr and a non-zero exit, never a traceback,
and no command ever prints a token or a session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._errors import InvalidArgument, SegmentNotFound, ShmCacheError
from ..codecs import JsonCodec
from ..shm import segment as _segment
from ..shm.cache import SharedMemorySessionCache
from ..shm.layout import HEADER, MAGIC
from ..sql import admin as _sql_admin


class CommandError(Exception):
    """A refusal worth one line to the user (exit status in ``code``)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _owner(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such user: {value!r}") from None


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return number


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


def cmd_stats(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        stats = cache.stats()
    stats["age_seconds"] = round(time.time() - stats["created"], 3)
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
                    f"{stats['size_bytes']} bytes)"),
        ("capacity", f"{stats['capacity']} sessions ({stats['slots']} slots, window "
                     f"{stats['window']}, value size {stats['value_size']})"),
        ("entries", f"{stats['entries']} live, {stats['expired']} expired, "
                    f"{stats['tombstones']} tombstones, {stats['invalid']} invalid"),
        ("load factor", f"{stats['load_factor']:.4f}"),
        ("hits / misses", f"{stats['hits']} / {stats['misses']}{rate}, "
                          f"{stats['processes']} processes"),
        ("evictions", str(stats["evictions"])),
        ("oversize values", str(stats["oversize"])),
        ("lock recoveries", str(stats["lock_recoveries"])),
        ("lock owner", owner_text),
        ("creator pid", f"{stats['creator_pid']} (keeper {stats['keeper_pid']})"),
        ("age", _age(stats["age_seconds"])),
    ]
    for label, value in rows:
        print(f"{label:<16} {value}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    with _attach(args) as cache:
        live = cache.stats()["entries"]
        if not args.yes:
            if not sys.stdin.isatty():
                raise CommandError("refusing to reset without --yes (stdin is not a terminal)", 2)
            answer = input(
                f"Drop all {live} live sessions in {cache.name!r}? Every user must log in "
                "again. [y/N] "
            )
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


def cmd_create(args: argparse.Namespace) -> int:
    cache = SharedMemorySessionCache.create(
        args.name, args.capacity, args.value_size, mode=args.mode
    )
    with cache:
        print(f"created {_segment.segment_path(cache.name)}: capacity {cache.capacity}, "
              f"value size {cache.value_size}, {cache.stats()['size_bytes']} bytes")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    name = _segment.normalize_name(args.name)
    path = _segment.segment_path(name)
    exists = os.path.exists(path) or os.path.exists(_segment.semaphore_path(name))
    if not exists:
        raise SegmentNotFound(f"no shmcache segment named {name!r} ({path})")
    if os.path.exists(path) and not args.force:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
        if head != MAGIC:
            raise CommandError(f"{path} is not a shmcache segment (use --force to remove it)")
    _segment.unlink_names(name)
    print(f"unlinked {name} (processes attached keep their mapping until they exit)")
    return 0


def _segments() -> list[dict[str, Any]]:
    found = []
    try:
        entries = sorted(os.scandir(_segment.SHM_DIR), key=lambda e: e.name)
    except OSError as exc:
        raise CommandError(f"cannot list {_segment.SHM_DIR}: {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("sem.") or not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        row: dict[str, Any] = {"name": entry.name, "owner": st.st_uid, "size_bytes": st.st_size,
                               "mode": f"{stat.S_IMODE(st.st_mode):o}"}
        try:
            with open(entry.path, "rb") as f:
                head = f.read(HEADER.size)
        except OSError:
            continue  # not ours to read: cannot be told apart from any other file
        if len(head) < HEADER.size or head[:8] != MAGIC:
            continue
        fields = HEADER.unpack(head)
        row.update(version=fields[1], capacity=fields[3], value_size=fields[6],
                   creator_pid=fields[10],
                   semaphore=os.path.exists(_segment.semaphore_path(entry.name)))
        with contextlib.suppress(KeyError):
            row["owner"] = pwd.getpwuid(st.st_uid).pw_name
        found.append(row)
    return found


def cmd_list(args: argparse.Namespace) -> int:
    rows = _segments()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no shmcache segments in {_segment.SHM_DIR}")
        return 0
    print(f"{'NAME':<32} {'OWNER':<10} {'MODE':<5} {'BYTES':>12} {'CAPACITY':>10} "
          f"{'VALUE':>6} {'CREATOR':>8} SEM")
    for r in rows:
        print(f"{r['name']:<32} {r['owner']!s:<10} {r['mode']:<5} {r['size_bytes']:>12} "
              f"{r['capacity']:>10} {r['value_size']:>6} {r['creator_pid']:>8} "
              f"{'yes' if r['semaphore'] else 'MISSING'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache", description="Shared-memory session cache: demo and administration."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace], int],
                *, segment: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        if segment:
            p.add_argument("name", metavar="NAME", help="segment name, as in /dev/shm/NAME, "
                           "or a database URL (stats, reset, revoke-user, purge, check)")
        return p

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
        p.add_argument("--owner", type=_owner, default=None, metavar="USER",
                       help="trust a segment owned by this user or uid (default: yourself)")
        p.add_argument("--allow-writable-by-others", action="store_true",
                       help="accept a segment that group or others may write")
    p = command("create", "create a segment (it stays until `shmcache unlink`)", cmd_create)
    p.add_argument("--capacity", type=_positive, required=True)
    p.add_argument("--value-size", type=int, default=0)
    p.add_argument("--mode", type=_mode, default=0o600, help="octal permission bits (default 600)")
    p = command("unlink", "remove a segment's names (attached processes keep it)", cmd_unlink)
    p.add_argument("--force", action="store_true", help="remove even if it is not shmcache's")
    p = command("list", "the shmcache segments on this host", cmd_list, segment=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    command("demo", "watch a logout in one worker reach the others", cmd_demo, segment=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if _sql_admin.is_url(getattr(args, "name", None)):  # a database (issue 14)
            return _sql_admin.run(args)
        return int(args.fn(args))
    except CommandError as exc:
        print(f"shmcache: {exc}", file=sys.stderr)
        return exc.code
    except (ShmCacheError, OSError) as exc:
        code = 2 if isinstance(exc, InvalidArgument) else 1
        print(f"shmcache: {args.command}: {exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("shmcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - python -m shmcache.cli.main
    sys.exit(main())
