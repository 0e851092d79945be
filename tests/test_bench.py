"""The benchmark suite's machinery on a tiny run (``--smoke``): it runs, and its JSON holds
every figure the README and the targets are made from. Speed is never asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-plots", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout, out


def test_environment_is_recorded(smoke: tuple[dict[str, Any], str, Path]) -> None:
    meta = smoke[0]["meta"]
    assert meta["mode"] == "smoke"
    assert meta["command"].startswith("python -m bench")
    env = meta["env"]
    for key in ("cpu", "cores", "python", "platform", "packages"):
        assert env[key], key
    assert env["packages"]["shmcache"] and env["packages"]["posix_ipc"]


def test_single_process_figures(smoke: tuple[dict[str, Any], str, Path]) -> None:
    backends = smoke[0]["single"]["backends"]
    assert set(backends) == {"inmemory", "shm"}
    for key, row in backends.items():
        assert row["hit_rate"] == 1.0, key  # the get-hit batches really hit
        for op in ("get_hit", "get_miss", "set", "invalidate", "invalidate_absent"):
            s = row["ops"][op]
            assert s["n"] >= 5, (key, op)
            for field in ("median", "p99", "ratio", "ratio_p99"):
                assert _positive(s[field]), (key, op, field, s[field])
            assert s["p99"] >= s["median"]
    for s in backends["inmemory"]["ops"].values():
        assert s["ratio"] == 1.0  # the baseline is its own reference


def test_multi_process_figures(smoke: tuple[dict[str, Any], str, Path]) -> None:
    multi = smoke[0]["multi"]
    assert set(multi["workloads"]) == {"sticky", "shared"}
    assert _positive(multi["machine"]["2"]["scaling"])
    for workload, rows in multi["workloads"].items():
        assert set(rows) == {"inmemory", "shm"}
        for key, row in rows.items():
            assert set(row["counts"]) == {"1", "2"}
            for n, c in row["counts"].items():
                where = (workload, key, n)
                assert "error" not in c, (where, c.get("error"))
                assert _positive(c["throughput"]) and _positive(c["scaling"]), where
                assert 0 < c["hit_rate"] <= 1, where
                get = c["latency"]["get"]
                assert get["median"] <= get["p99"] <= get["p999"], where
                assert _positive(get["ratio_p999"]), where


def test_table_memory_and_targets(smoke: tuple[dict[str, Any], str, Path]) -> None:
    result = smoke[0]
    table = result["table"]
    assert [lv["fraction"] for lv in table["levels"]] == [0.1, 1.0]
    full = table["levels"][-1]
    assert full["entries"] + full["evictions"] == table["capacity"]
    assert table["check_after"] == []
    assert table["churn"]["ops"] >= 2000
    assert all(_positive(v) for v in table["churn"]["drift"].values())
    modes = {m["value_size"]: m for m in result["memory"]["per_mode"]}
    assert set(modes) == {0, 64, 256}
    assert modes[0]["bytes_per_session"] < modes[64]["bytes_per_session"]
    big = result["memory"]["big"][0]
    assert _positive(big["create_s"]) and _positive(big["attach_other_process_s"])
    assert "e2e" not in result  # --smoke leaves gunicorn out
    names = [t["name"] for t in result["targets"]]
    assert any("get (hit)" in n for n in names) and any("per session" in n for n in names)
    for t in result["targets"]:
        assert t["met"] in (True, False, None)
        assert all(_positive(v) for v in t["figures"].values()), t


def test_terminal_report(smoke: tuple[dict[str, Any], str, Path]) -> None:
    stdout = smoke[1]
    for title in ("Single process", "Many processes, sticky", "Table behaviour", "Memory",
                  "Targets (issues 4, 11 and 15)"):
        assert title in stdout


def test_readme_section_replaces_only_the_performance_sections(
    smoke: tuple[dict[str, Any], str, Path], tmp_path: Path
) -> None:
    from bench import readme, targets

    result = smoke[0]
    result["targets"] = targets.evaluate(result)
    (tmp_path / "README.md").write_text(
        "# x\n\n## Limits\n\nkeep me\n\n## Performance\n\nOLD-PERFORMANCE-TEXT\n\n"
        "## Benchmarks seen here\n\nBENCH-PLACEHOLDER\n\n## After\n\nkeep me too\n"
    )
    readme.publish(result, [], tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "keep me\n" in text and "## After\n\nkeep me too" in text
    assert "BENCH-PLACEHOLDER" not in text and "OLD-PERFORMANCE-TEXT" not in text
    assert text.count("## Performance") == 1
    assert "python -m bench --smoke" in text
    assert "| InMemorySessionCache (seed) |" in text


def test_every_missed_target_is_explained_in_one_line(
    smoke: tuple[dict[str, Any], str, Path],
) -> None:
    """Issue 12: the README showed five MISSED targets with no word beside them."""
    from bench import report, targets

    names = {t["name"] for t in targets.evaluate(smoke[0])}
    full_only = {"full run time"}  # judged by a full run only, not by this smoke run
    assert set(targets.WHY_MISSED) <= names | full_only  # none for a target that is gone
    forced = [dict(t, met=False) for t in targets.evaluate(smoke[0])]
    for t in forced:  # whatever a run misses, the generated table says why
        t["why"] = targets.WHY_MISSED.get(t["name"], "")
    rows = report.targets_table(forced)[2]
    explained = {r[0] for r in rows if r[4]}
    assert explained == set(targets.WHY_MISSED) - full_only
    assert all("\n" not in why and "|" not in why for why in targets.WHY_MISSED.values())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("**Targets (issues 4, 11 and 15)**"):].split("\n\n")[1]
    missed = [row.split(" | ") for row in table.splitlines() if "| MISSED |" in row]
    assert missed, "the README's targets table has no MISSED row to check"
    for cells in missed:
        name, why = cells[0].lstrip("| "), cells[4].rstrip(" |")
        assert why == targets.WHY_MISSED[name], name


def test_instruction_counts() -> None:
    """bench/instructions.py (issue 15): its driver's phases under callgrind, tiny. Without
    valgrind the driver still runs, so the phases cannot rot where the tool is missing."""
    from bench import instructions
    from shmcache.shm import fast

    keys = ("seed", "c" if fast.compiled_available() else "py")
    if instructions.valgrind_missing():
        for key in keys:
            instructions._drive(key, 20)
        return
    result = instructions.run(n=20, keys=keys, note=lambda msg: None)
    for key in keys:
        row = result["variants"][key]
        assert "error" not in row, row
        assert set(row["per_call"]) == set(instructions.OPS) - {"first_read"} or key == "seed"
        assert all(_positive(v) for v in row["per_call"].values()), row
        assert all(_positive(v) for v in row["ratio"].values()), row
    assert result["variants"]["seed"]["ratio"]["get_hit"] == 1.0
    title, headers, rows = instructions.table(result)
    assert "callgrind" in title and len(rows) == 2 and all(len(r) == len(headers) for r in rows)


def test_plots(smoke: tuple[dict[str, Any], str, Path], tmp_path: Path) -> None:
    from bench import plots  # matplotlib comes with the test extra: missing is a failure

    written = plots.write_all(smoke[0], tmp_path)
    assert {p.name for p in written} == {"latency.png", "scaling.png", "table.png"}
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the real app (issue 11): FastAPI under gunicorn with uvicorn workers --------------------

APP_VARIANTS = [(d, m) for d in ("sync", "async") for m in ("keepalive", "close")]


@pytest.fixture(scope="module")
def app_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """A tiny round (1 s, no warm-up) of every variant, on the seed and a value-mode cache."""
    out = tmp_path_factory.mktemp("bench-app")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "app", "--app-seconds", "1",
         "--no-plots", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), proc.stdout


def test_real_app_counts_every_request(app_run: tuple[dict[str, Any], str]) -> None:
    app = app_run[0]["app"]
    assert "uvicorn_worker.UvicornWorker -w 4" in app["server"]
    assert app["users"] == 200 and app["ttl"] == 10
    assert set(app["caches"]) == {"inmemory", "shm-512"}
    for key, row in app["caches"].items():
        assert not row["skipped_variants"], (key, row["skipped_variants"])
        for dep, mode in APP_VARIANTS:
            v = row["variants"][dep][mode]
            where = (key, dep, mode)
            assert _positive(v["rps"]) and v["requests"] > 0, where
            lat = v["latency_us"]
            assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"], where
            c = v["counted"]
            # Every request the auth dependency ran is a hit, a validation or a 401, and
            # every worker counted its own: the workers' counts add up.
            assert c["requests"] > 0, where
            assert c["requests"] == c["hits"] + c["db_found"] + c["rejected"], (where, c)
            assert c["db_found"] <= c["db_lookups"], (where, c)
            assert len(v["per_worker"]) == 4 and sum(v["per_worker"]) == c["requests"], where
            assert v["accepted"] == c["hits"] + c["db_found"], where
            assert 0 <= v["validations_per_1000"] <= 1000, where
            # TTL 10 s, and a round far shorter: a user is validated about once per worker
            # (twice when two of its requests miss in one worker at once: at most the
            # connections in flight more).
            assert c["db_found"] <= 200 * 4 + 32, (where, c)
            # Both logouts of the round returned, and the stale count is a count.
            assert c["logouts"] == 2 and v["logout_failures"] == 0, (where, v["rounds"])
            stale = v["stale"]
            assert stale["logouts"] == 2, where
            assert 0 <= stale["users"] <= 2 and stale["accepted_after_logout"] >= 0, where
            assert (stale["users"] == 0) == (stale["accepted_after_logout"] == 0), where
            assert stale["overlapping_validations"] >= 0, where
    seed = app["caches"]["inmemory"]["variants"]
    for dep, mode in APP_VARIANTS:
        if seed[dep][mode]["validations_per_1000"] > 0:  # else no ratio to speak of
            assert seed[dep][mode]["validations_ratio"] == 1.0
    stats = app["caches"]["shm-512"]["cache_stats"]
    assert set(stats) == {"sync", "async"} and stats["sync"]["oversize"] == 0


def test_real_app_report_targets_plot_and_readme(
    app_run: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    result, stdout = app_run
    for title in ("Real app, database validations per 1000 requests", "Real app under load",
                  "Targets (issues 4, 11 and 15)"):
        assert title in stdout
    names = [t["name"] for t in result["targets"]]
    assert sum(n.startswith("real app") for n in names) == 3
    logout = next(t for t in result["targets"] if "logout returned" in t["name"])
    assert set(logout["figures"]) == {"shmcache, value_size=512"}
    assert set(logout["context"]) == {"seed (its bug)"}
    pytest.importorskip("matplotlib")
    from bench import plots, readme

    png = plots.app(result["app"], tmp_path / "app.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.section(result, ["docs/bench-app.png"])
    assert "| InMemorySessionCache (seed), 4 workers |" in text
    assert "![the real app" in text and "(docs/bench-app.png)" in text


def test_stale_acceptances_are_told_from_races_and_earlier_requests() -> None:
    from bench.appcounters import stale_acceptances

    done = {1: 1000, 2: 5000}  # user -> instant (ns) its logout returned
    accepts = [
        (1, 900, 950, False),  # before the logout: fine
        (1, 990, 1010, False),  # a hit whose lookup began before the logout returned
        (1, 1001, 1002, False),  # after: stale
        (1, 3000, 3001, False),  # stale, 2000 ns after
        (1, 9000, 9001, False),  # after the end of the round: not counted
        (2, 4000, 6000, True),  # a validation across the logout: overlapping
        (2, 4000, 4500, True),  # validated and cached before the logout: fine
        (3, 2000, 2001, False),  # never logged out
    ]
    assert stale_acceptances(accepts, done, until_ns=8000) == {
        "logouts": 2, "accepted_after_logout": 2, "users": 1, "longest_ms": 0.002,
        "overlapping_validations": 1,
    }


@pytest.mark.parametrize("args, message", [
    (["--app-caches", "shm,nope"], "--app-caches: unknown cache 'nope'"),
    (["--app-seconds", "0"], "--app-seconds must be in (0, 600]"),
    (["--app-cache", "not-a-url"], "is not a cache URL"),
])
def test_real_app_options_are_checked(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--only", "app", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def goals_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Issue 11's goals on the real app: the seed's cache, hash-only and value mode, in one
    run. The app's TTL is shortened to 1 s so that a 1.5 s warm-up reaches the steady state
    and a 4 s round spans four TTLs: each figure is then the caches' steady work, not what
    an earlier variant left in them."""
    out = tmp_path_factory.mktemp("bench-goals")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "app", "--app-seconds", "4",
         "--app-warmup", "1.5", "--app-ttl", "1", "--app-caches", "inmemory,shm,shm-512",
         "--no-plots", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    app: dict[str, Any] = json.loads((out / "bench.json").read_text())["app"]
    return app


@pytest.mark.parametrize("dependency", ["sync", "async"])
def test_real_app_meets_issue_11_validation_goals(
    goals_run: dict[str, Any], dependency: str
) -> None:
    """Database validations, new connection per request (the kernel spreads each user's
    requests over the 4 workers), against the seed's cache in the same run: hash-only at
    most 1.5x (it was 17-26x before equal sets kept other workers' copies), value mode at
    most 0.5x (one worker validates, all read), and no stale acceptance.

    Validations follow the clock (a user is revalidated once its TTL runs out), requests
    follow the load, and on a shared 2-core machine the load of two servers differs by up
    to 2x: so the ratio compared is validations per user per TTL (the same as issue 11's
    "per 1000 requests" ratio at equal throughput, which the README's run reports)."""
    ttl, users = goals_run["ttl"], goals_run["users"]

    def per_user_ttl(key: str) -> float:
        v = goals_run["caches"][key]["variants"][dependency]["close"]
        seconds = v["requests"] / v["rps"]
        return float(v["counted"]["db_found"]) / (users * seconds / ttl)

    seed = per_user_ttl("inmemory")
    assert seed > 1.0  # each worker validates each user about once per TTL
    assert per_user_ttl("shm") <= 1.5 * seed, (per_user_ttl("shm"), seed)
    assert per_user_ttl("shm-512") <= 0.5 * seed, (per_user_ttl("shm-512"), seed)
    for key in ("shm", "shm-512"):
        stale = goals_run["caches"][key]["variants"][dependency]["close"]["stale"]
        assert stale["accepted_after_logout"] == 0, (key, stale)
