"""``python -m bench [--quick | --smoke] [--out DIR] [--publish]``: run, report, plot."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import (
    app,
    e2e,
    instructions,
    memory,
    mix,
    multi,
    plots,
    readme,
    report,
    single,
    table,
    targets,
)
from . import backends as backends_mod
from .config import FULL, PRESETS, Config
from .env import cpu_times, environment, load_during
from .progress import Progress

ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()  # imported first thing by ``python -m bench``
SECTIONS = ("single", "instructions", "multi", "mix", "table", "e2e", "memory", "app")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="every section, under a minute")
    size.add_argument("--smoke", action="store_true",
                      help="a few seconds, two backends, no end-to-end (for tests)")
    p.add_argument("--out", type=Path, help="output directory (default bench/results/MODE)")
    p.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    p.add_argument("--backends", help="comma-separated backend keys of "
                   f"{','.join(b.key for b in backends_mod.BACKENDS)}")
    p.add_argument("--app-caches", help="comma-separated caches of the real app (section "
                   f"app) of {','.join(app.BUILTIN_KEYS)}")
    p.add_argument("--app-cache", action="append", default=[], metavar="[LABEL=]URL",
                   help="also run the real app on this open_cache URL (repeatable)")
    p.add_argument("--app-seconds", type=float, metavar="S",
                   help="length of each measured round of the real app")
    p.add_argument("--app-warmup", type=float, metavar="S",
                   help="unmeasured load before each round of the real app")
    p.add_argument("--app-ttl", type=float, metavar="S",
                   help="the real app's cache TTL (default 10 s, the seed app's)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--publish", action="store_true",
                   help="copy the plots to docs/ and rewrite README.md's Performance section")
    p.add_argument("--from-json", type=Path, help="report (and publish) an earlier run")
    return p


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null: the JSON stays strict for any reader."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _measure(cfg: Config, sections: list[str], keys: tuple[str, ...] | None,
             argv: list[str], urls: tuple[str, ...] = (), args_only: bool = False
             ) -> dict[str, Any]:
    progress = Progress(len(sections) + 1)
    progress.section("setup")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    skipped: dict[str, str] = {}

    def note(msg: str) -> None:
        progress.note(msg)

    chosen = backends_mod.available(keys if keys is not None else cfg.backends, note)
    for b in backends_mod.BACKENDS:
        if b.missing() is not None:
            skipped[b.key] = str(b.missing())
    res = backends_mod.Resources()
    result: dict[str, Any] = {}
    machine_load: dict[str, Any] = {}
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "single": lambda: single.run(cfg, chosen, res, progress),
        "instructions": lambda: instructions.run(cfg.instruction_calls, note=note),
        "multi": lambda: multi.run(cfg, chosen, res, progress),
        "mix": lambda: mix.run(cfg, progress),
        "table": lambda: table.run(cfg, progress),
        "e2e": lambda: e2e.run(cfg, chosen, res, progress),
        "memory": lambda: memory.run(cfg, progress),
        "app": lambda: app.run(cfg, res, progress, urls),
    }
    try:
        for name in sections:
            progress.section(name)
            if name == "e2e" and not cfg.e2e_seconds:
                continue
            if name == "instructions" and not cfg.instruction_calls:
                continue
            if name == "app" and not cfg.app_seconds:
                if args_only:
                    note(f"the real app is not part of --{cfg.name}: add --app-seconds S")
                continue
            cpu0, s0 = cpu_times(), time.perf_counter()
            result[name] = runners[name]()
            machine_load[name] = load_during(cpu0, cpu_times(), time.perf_counter() - s0)
    finally:
        res.close()
    seconds = time.perf_counter() - T0
    progress.done()
    command = "python -m bench" + ("" if not argv else " " + " ".join(
        a for a in argv if a != "--publish"))
    result["meta"] = {
        "command": command.strip(), "mode": cfg.name, "started": started,
        "seconds": seconds, "sections": sections, "config": cfg.to_json(),
        "skipped": skipped, "env": environment(ROOT), "machine_load": machine_load,
    }
    return result


def _app_options(cfg: Config, args: argparse.Namespace) -> Config:
    """The real app's command-line settings over the preset's (``ValueError`` if wrong)."""
    changes: dict[str, Any] = {}
    if args.app_seconds is not None:
        if not (math.isfinite(args.app_seconds) and 0 < args.app_seconds <= 600):
            raise ValueError(f"--app-seconds must be in (0, 600], got {args.app_seconds:g}")
        changes["app_seconds"] = args.app_seconds
    for flag, key, low in (("--app-warmup", "app_warmup", 0.0), ("--app-ttl", "app_ttl", 0.1)):
        value = getattr(args, key)
        if value is not None:
            if not (math.isfinite(value) and low <= value <= 600):
                raise ValueError(f"{flag} must be in [{low:g}, 600], got {value:g}")
            changes[key] = value
    if args.app_caches is not None:
        chosen = tuple(k for k in args.app_caches.split(",") if k)
        unknown = [k for k in chosen if k not in app.BUILTIN_KEYS]
        if unknown:
            raise ValueError(f"--app-caches: unknown cache {unknown[0]!r}; choose from "
                             f"{', '.join(app.BUILTIN_KEYS)}")
        changes["app_caches"] = chosen
    for url in args.app_cache:
        if "://" not in url:
            raise ValueError(f"--app-cache: {url!r} is not a cache URL (scheme://...)")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    cfg = PRESETS["smoke"] if args.smoke else PRESETS["quick"] if args.quick else FULL
    try:
        cfg = _app_options(cfg, args)
    except ValueError as exc:
        print(f"python -m bench: error: {exc}", file=sys.stderr)
        return 2
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
    else:
        sections = [s for s in SECTIONS if args.only is None or s in args.only.split(",")]
        keys = tuple(args.backends.split(",")) if args.backends else None
        result = _measure(cfg, sections, keys, argv, tuple(args.app_cache),
                          args_only=args.only is not None)
        out = args.out or ROOT / "bench" / "results" / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if not args.no_plots:
        try:
            written = plots.write_all(result, out)
        except ImportError:
            print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
    if not args.from_json:
        # The whole command counts against the time budget, plots included.
        result["meta"]["seconds"] = time.perf_counter() - T0
    result["targets"] = targets.evaluate(result)
    path = out / "bench.json"
    path.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    for t in report.all_tables(result):
        print(report.text(t))
        print()
    print(f"figures: {path}")
    for p in written:
        print(f"plot: {p}")
    if args.publish:
        print(f"published: {readme.publish(result, written, ROOT)} and docs/bench-*.png")
    return 0
