"""The ``shmcache`` command (also ``python -m shmcache``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcache", description="Shared-memory session cache: demo and administration."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="show a logout in one worker process seen by another")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from . import _demo

        return _demo.run()
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":  # pragma: no cover - python -m shmcache._cli
    sys.exit(main())
