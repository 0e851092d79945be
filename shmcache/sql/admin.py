"""The ``shmcache`` command on a database: ``stats``, ``reset``, ``revoke-user``,
``purge`` and ``check`` take a ``sqlite:///`` or ``postgresql://`` URL where they take a
segment name.

Layer: integrations (the command line). ``shmcache.cli.main`` hands every command whose
NAME contains ``://`` to ``run``; errors are raised as ``ShmCacheError`` for it to print
on one line. Query parameters are ``open_cache``'s (``?table=myapp_sessions``). When the
clients are given ``secret=``, the command needs it too, from ``$SHMCACHE_SECRET`` (never a
command-line argument: it would show in ``ps``). No command prints a token or a session.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .._errors import CacheUnavailable, InvalidArgument, SecretMismatch
from .cache import DatabaseSessionCache
from .urls import OPENERS, dialect_of, redact

COMMANDS = ("stats", "reset", "revoke-user", "purge", "check")
SECRET_ENV = "SHMCACHE_SECRET"


def is_url(name: object) -> bool:
    return isinstance(name, str) and "://" in name


def open_url(url: str) -> DatabaseSessionCache:
    """The cache a database URL names, with ``$SHMCACHE_SECRET`` if set."""
    dialect = dialect_of(url)
    if dialect is None:
        raise InvalidArgument(
            f"{redact(url)!r}: give a segment name, or a database URL "
            "(sqlite:////path/file.db, postgresql://user@host/db)"
        )
    secret = os.environ.get(SECRET_ENV) or None
    cache = OPENERS[url.partition("://")[0].lower()](url, {"secret": secret})
    assert isinstance(cache, DatabaseSessionCache)
    return cache


def run(args: argparse.Namespace) -> int:
    """Run ``args.command`` on the database ``args.name`` names; the exit status."""
    url = args.name
    if args.command not in COMMANDS:
        raise InvalidArgument(f"{args.command} takes a segment name, not a URL")
    if getattr(args, "owner", None) is not None or getattr(args, "allow_writable_by_others",
                                                           False):
        raise InvalidArgument("--owner and --allow-writable-by-others apply to segments only")
    # psycopg_pool logs each failed connection attempt; the command says it in one line.
    logging.getLogger("psycopg").setLevel(logging.CRITICAL)
    shown = redact(url)
    try:
        with open_url(url) as cache:
            return _COMMANDS[args.command](cache, args, shown)
    except (InvalidArgument, SecretMismatch) as exc:
        if "secret" in str(exc) and not os.environ.get(SECRET_ENV):
            raise type(exc)(f"{exc} (the command reads it from ${SECRET_ENV})") from None
        raise


def _stats(cache: DatabaseSessionCache, args: argparse.Namespace, shown: str) -> int:
    stats = cache.stats()
    if "error" in stats:
        raise CacheUnavailable(stats["error"])
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    rows: list[tuple[str, Any]] = [
        ("database", f"{stats['database']} ({stats['dialect']})"),
        ("table", stats["table"]),
        ("entries", f"{stats['entries']} live, {stats['expired']} expired "
                    "(reclaimed as sessions are written, or by `shmcache purge`)"),
        ("users", f"{stats['users']} with live sessions"),
        ("leases", f"{stats['lease_drops']} sets refused (a logout came after their miss), "
                   f"{stats['stamps']} logout stamps kept"),
        ("secret", "shared, kept in the database" if stats["shared_secret"]
         else "given to each client (secret=)"),
    ]
    if "unlogged" in stats:
        rows.append(("unlogged", "yes (a crash empties it)" if stats["unlogged"] else "no"))
    if "journal_mode" in stats:
        rows.append(("journal mode", stats["journal_mode"]))
    for label, value in rows:
        print(f"{label:<16} {value}")
    return 0


def _reset(cache: DatabaseSessionCache, args: argparse.Namespace, shown: str) -> int:
    stats = cache.stats()
    if "error" in stats:
        raise CacheUnavailable(stats["error"])
    live = stats["entries"]
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgument("refusing to reset without --yes (stdin is not a terminal)")
        answer = input(f"Drop all {live} live sessions in {shown} (table {cache.table})? "
                       "Every user must log in again. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not reset")
            return 1
    cache.clear()
    print(f"reset {shown} (table {cache.table}): dropped {live} live sessions")
    return 0


def _revoke_user(cache: DatabaseSessionCache, args: argparse.Namespace, shown: str) -> int:
    dropped = cache.invalidate_by_user(args.user_id)
    print(f"revoked user {args.user_id!r} in {shown} (table {cache.table}): "
          f"dropped {dropped} live sessions")
    return 0


def _purge(cache: DatabaseSessionCache, args: argparse.Namespace, shown: str) -> int:
    count = cache.purge()
    print(f"purged {count} expired or damaged entries from {shown} (table {cache.table})")
    return 0


def _check(cache: DatabaseSessionCache, args: argparse.Namespace, shown: str) -> int:
    problems = cache.check()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{shown}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{shown} (table {cache.table}): ok")
    return 0


_COMMANDS = {"stats": _stats, "reset": _reset, "revoke-user": _revoke_user,
             "purge": _purge, "check": _check}
