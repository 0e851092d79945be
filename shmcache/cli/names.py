"""``shmcache create``, ``unlink`` and ``list``: the commands on the names in /dev/shm.

They look at names and files before (or instead of) attaching; ``unlink`` applies the same
owner and format checks as the commands that attach (issue 12: it used to remove another
user's segment, and any file that merely started with the magic).

A semaphore ``sem.NAME`` left by an older shmcache (README, "Administration"): ``list``
never shows it (it is not a segment: no magic), ``unlink`` removes it with the segment, and
``unlink --force`` removes it when it is all that is left of ``NAME``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import stat
from typing import Any

from .._errors import SegmentNotFound, ShmCacheError
from ..codecs import JsonCodec
from ..shm import segment as _segment
from ..shm.cache import SharedMemorySessionCache
from ..shm.layout import HEADER, MAGIC
from .common import CommandError, for_cli, user_label


def cmd_create(args: argparse.Namespace) -> int:
    mode = args.mode
    if mode & 0o600 != 0o600:
        raise CommandError(f"--mode {mode:o} does not let the owner read and write it", 2)
    if mode & 0o022 and not args.allow_writable_by_others:
        # Every other command would then refuse it (anyone who may write it may feed the
        # workers sessions): say so now rather than create what `stats` rejects.
        raise CommandError(
            f"--mode {mode:o} lets group or others write the segment, and every command "
            "refuses such a segment without --allow-writable-by-others: add it to create "
            "one anyway, or use 600 or 640", 2,
        )
    # The command never stores a session: naming a codec keeps create's refusal of default
    # pickle in a segment others may write (a rule for the app's own objects) out of the way.
    cache = SharedMemorySessionCache.create(
        args.name, args.capacity, args.value_size, mode=mode, codec=JsonCodec()
    )
    with cache:
        print(f"created {_segment.segment_path(cache.name)}: capacity {cache.capacity}, "
              f"value size {cache.value_size}, {cache.stats()['size_bytes']} bytes, "
              f"mode {mode:o}")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    """The same checks as every other command before a name is removed: its owner
    (``--owner``) and that it is a whole shmcache segment (``--force`` removes anything
    else of yours: a segment its creator died making, another layout version, a stray
    file). An older shmcache's semaphore beside it goes too."""
    name = _segment.normalize_name(args.name)
    path = _segment.segment_path(name)
    expected = os.geteuid() if args.owner is None else args.owner
    legacy = _segment.legacy_semaphore_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not _segment.has_legacy_semaphore(name, expected):
            raise SegmentNotFound(f"no shmcache segment named {name!r} ({path})") from None
        if not args.force:
            raise CommandError(
                f"no shmcache segment named {name!r}, only {legacy}, a semaphore left by an "
                "older shmcache; not removing it (--force removes it)"
            ) from None
        _segment.remove_legacy_semaphore(name, expected)
        print(f"removed {legacy}, a semaphore left by an older shmcache")
        return 0
    if st.st_uid != expected:
        raise CommandError(
            f"refusing {path}: owned by {user_label(st.st_uid)}, not {user_label(expected)} "
            "(--owner USER to remove another user's segment)"
        )
    if stat.S_ISDIR(st.st_mode):
        raise CommandError(f"{path} is a directory, not a segment: not removing it")
    if not args.force:
        try:
            # Whether others may write it does not matter here: nothing is read from it.
            cache = SharedMemorySessionCache.attach(
                name, owner_uid=expected, allow_writable_by_others=True, codec=JsonCodec()
            )
        except ShmCacheError as exc:
            raise CommandError(
                f"{for_cli(str(exc))}; not removing it (--force removes it)"
            ) from None
        cache.close()
    also = ""
    if _segment.unlink_name(name, expected):
        also = f"; also removed {legacy}, a semaphore left by an older shmcache"
    print(f"unlinked {name} (processes attached keep their mapping until they exit){also}")
    return 0


def _segments() -> list[dict[str, Any]]:
    found = []
    try:
        entries = sorted(os.scandir(_segment.SHM_DIR), key=lambda e: e.name)
    except OSError as exc:
        raise CommandError(f"cannot list {_segment.SHM_DIR}: {exc.strerror}") from None
    for entry in entries:
        # No skipping by name: ``sem.NAME`` may be a segment of that name, and an older
        # shmcache's semaphore there has no magic, so the check below leaves it out.
        if not entry.is_file(follow_symlinks=False):
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
                   creator_pid=fields[10])
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
          f"{'VALUE':>6} {'CREATOR':>8}")
    for r in rows:
        print(f"{r['name']:<32} {r['owner']!s:<10} {r['mode']:<5} {r['size_bytes']:>12} "
              f"{r['capacity']:>10} {r['value_size']:>6} {r['creator_pid']:>8}")
    return 0
