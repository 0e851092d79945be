"""The figures as tables: plain text for the terminal, Markdown for the README.

Each ``*_table`` returns ``(title, headers, rows)``; both renderings share them, so the
README cannot say something the terminal did not.
"""

from __future__ import annotations

from typing import Any

from .instructions import table as instructions_table
from .stats import finite

Table = tuple[str, list[str], list[list[str]]]
OP_NAMES = {"get_hit": "get (hit)", "get_miss": "get (miss)", "set": "set",
            "invalidate": "invalidate", "invalidate_absent": "invalidate (absent)"}


def ns(x: Any) -> str:
    if not finite(x):
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} ms"
    if x >= 1e4:
        return f"{x / 1e3:.0f} us"
    if x >= 1e3:
        return f"{x / 1e3:.1f} us"
    return f"{x:.0f} ns"


def times(x: Any) -> str:
    if not finite(x):
        return "-"
    return f"{x:.2f}x" if x < 100 else f"{x:.0f}x"


def single_table(single: dict[str, Any]) -> Table:
    headers = ["backend"] + [f"{n} median / p99 (ratio)" for n in OP_NAMES.values()]
    rows = []
    for row in single["backends"].values():
        if "ops" not in row:
            rows.append([row["label"], f"skipped: {row.get('skipped', '')}",
                         *[""] * (len(OP_NAMES) - 1)])
            continue
        cells = [row["label"]]
        for op in OP_NAMES:
            s = row["ops"].get(op)
            if s is None:  # a JSON from before this operation was measured
                cells.append("-")
                continue
            cells.append(f"{ns(s['median'])} / {ns(s['p99'])} ({times(s['ratio'])})")
        rows.append(cells)
    return ("Single process, ns per call (ratio of medians to the seed's in-memory cache)",
            headers, rows)


def other_table(single: dict[str, Any]) -> Table:
    headers = ["backend", "first read", "get (hit) median / p99", "in-memory get, same child",
               "ratio", "first read ratio"]
    rows = []
    for row in single["backends"].values():
        o = row.get("other_process")
        if not o:
            continue
        if "error" in o:
            rows.append([row["label"], f"error: {o['error']}", "", "", "", ""])
            continue
        rows.append([
            row["label"], ns(o["first_read"]["median"]),
            f"{ns(o['get_hit']['median'])} / {ns(o['get_hit']['p99'])}",
            ns(o["inmemory_get_hit"]["median"]), times(o["ratio"]),
            times(o.get("first_read_ratio")),
        ])
    return ("get (hit) in a process that did not set the session", headers, rows)


def multi_table(multi: dict[str, Any], workload: str) -> Table:
    rows_in = multi["workloads"].get(workload, {})
    counts = sorted({int(n) for r in rows_in.values() for n in r["counts"]})
    headers = ["backend", "processes", "ops/s (all)", "scaling", "get p50 / p99 / p99.9",
               "p99.9 vs in-memory", "set p99.9", "get hit rate"]
    rows = []
    for row in rows_in.values():
        for n in counts:
            c = row["counts"].get(str(n), {})
            if "error" in c or not c:
                rows.append([row["label"], str(n), f"error: {c.get('error', 'missing')}",
                             "", "", "", "", ""])
                continue
            g = c["latency"]["get"]
            rows.append([
                row["label"], str(n), f"{c['throughput']:,.0f}", times(c["scaling"]),
                f"{ns(g['median'])} / {ns(g['p99'])} / {ns(g['p999'])}",
                times(g.get("ratio_p999")), ns(c["latency"]["set"]["p999"]),
                f"{c['hit_rate']:.0%}" if finite(c["hit_rate"]) else "-",
            ])
    ceiling = ", ".join(f"{n}: {m['scaling']:.2f}x" for n, m in multi["machine"].items()
                        if finite(m["scaling"]))
    return (f"Many processes, {workload} tokens (90% get / 9% set / 1% invalidate; this "
            f"machine's ceiling, an empty loop: {ceiling})", headers, rows)


def table_table(table: dict[str, Any]) -> Table:
    headers = ["point", "load factor", "get (miss)", "get (first read)", "set", "evictions"]
    rows = []
    for lv in table["levels"]:
        rows.append([f"{lv['fraction']:.0%} of capacity", f"{lv['load_factor']:.2f}",
                     ns(lv["get_miss"]["median"]), ns(lv["get_first_read"]["median"]),
                     ns(lv["set"]["median"]), str(lv["evictions"])])
    for p in (table["churn"]["points"][0], table["churn"]["points"][-1]):
        rows.append([f"churn, after {p['ops']:,} ops", f"{p['load_factor']:.2f}",
                     ns(p["get_miss"]["median"]), ns(p["get_first_read"]["median"]),
                     ns(p["set"]["median"]), str(p["evictions"])])
    return (f"Table behaviour (capacity {table['capacity']:,}, value_size "
            f"{table['value_size']}; medians; check() after churn: "
            f"{table['check_after'] or 'clean'})", headers, rows)


def e2e_table(e2e: dict[str, Any]) -> Table:
    headers = ["cache", "requests/s", "vs in-memory (median of rounds; each round)",
               "latency p50 / p99 / p99.9", "cache hit rate", "errors"]
    rows = []
    for row in e2e["backends"].values():
        if "rps" not in row:
            rows.append([row["label"], f"skipped: {row.get('skipped', '')}", "", "", "", ""])
            continue
        lat = row["latency_us"]
        hr = row.get("hit_rate")
        rounds = ", ".join(times(x) for x in row.get("rps_ratio_rounds", []))
        rows.append([row["label"], f"{row['rps']:,.0f}",
                     f"{times(row.get('rps_ratio'))} ({rounds})" if rounds else "-",
                     " / ".join(ns(lat[p] * 1000) for p in ("p50", "p99", "p999")),
                     f"{hr:.1%}" if finite(hr) else "-", str(row["errors"])])
    return (f"End to end: {e2e['server']}, load from {e2e['client']}", headers, rows)


APP_VARIANTS = (("sync", "close"), ("sync", "keepalive"), ("async", "close"),
                ("async", "keepalive"))


def _per_1000(x: Any) -> str:
    if not finite(x):
        return "-"
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def app_validations_table(data: dict[str, Any]) -> Table:
    modes = data["modes"]
    variants = [(d, m) for d, m in APP_VARIANTS if d in data["dependencies"]]
    headers = ["cache"] + [f"{d} dependency, {modes[m]}" for d, m in variants]
    rows = []
    for row in data["caches"].values():
        if "skipped" in row:
            rows.append([row["label"], f"skipped: {row['skipped']}", *[""] * (len(variants) - 1)])
            continue
        cells = [row["label"]]
        for d, m in variants:
            v = row["variants"].get(d, {}).get(m)
            if v is None:
                cells.append(f"skipped: {row['skipped_variants'].get(d, '')}"[:60])
                continue
            r = v.get("validations_ratio")
            cells.append(_per_1000(v["validations_per_1000"])
                         + (f" ({times(r)})" if finite(r) else ""))
        rows.append(cells)
    return (f"Real app, database validations per 1000 requests (ratio to the seed's, same "
            f"column): {data['server']}, {data['users']} users, TTL {data['ttl']:g} s, "
            f"{data['rounds']} x {data['seconds']:g} s per column, load from "
            f"{data['client']}", headers, rows)


def app_load_table(data: dict[str, Any]) -> Table:
    headers = ["cache", "dependency", "connections", "requests/s", "latency p50 / p99",
               "accepted after logout (users; longest)", "validations overlapping a logout",
               "requests per worker", "errors"]
    rows = []
    for row in data["caches"].values():
        for d, m in APP_VARIANTS:
            v = row["variants"].get(d, {}).get(m)
            if v is None:
                continue
            lat, st = v["latency_us"], v["stale"]
            spread = v["per_worker"]
            stale = str(st["accepted_after_logout"])
            if st["accepted_after_logout"]:
                stale += f" ({st['users']} of {st['logouts']}; {st['longest_ms']:,.0f} ms)"
            errors = str(v["socket_errors"])
            if v["logout_failures"]:
                errors += f", {v['logout_failures']} logouts failed"
            rows.append([
                row["label"], d, data["modes"][m], f"{v['rps']:,.0f}",
                " / ".join(ns(lat[p] * 1000) for p in ("p50", "p99")), stale,
                str(st.get("overlapping_validations", "-")),
                " / ".join(f"{x / max(1, sum(spread)):.0%}" for x in spread), errors,
            ])
    return (f"Real app under load: {data['logouts_per_round']} users log out during each "
            "round; a request of theirs accepted after their logout returned is stale; a "
            "validation that began before the logout returned and ended after it may have "
            "cached the logged-out session", headers, rows)


def mix_table(mix: dict[str, Any]) -> Table:
    headers = ["cache", "CPU per request (median of rounds)", "vs the seed's", "each round",
               "get miss rate"]
    rows = []
    for v in mix["variants"].values():
        rows.append([v["label"], ns(v["cpu_per_request_ns"]), times(v["ratio"]),
                     ", ".join(ns(x) for x in v["rounds_ns"]), f"{100 * v['miss_rate']:.1f}%"])
    return (f"Shared-token mix: {mix['procs']} processes, {mix['pool']:,} tokens shared, "
            f"{mix['requests']:,} requests each ({100 * mix['logout']:.0f}% invalidate, the "
            "rest get and set on a miss)", headers, rows)


def memory_table(memory: dict[str, Any]) -> Table:
    headers = ["segment", "bytes per session", "size / capacity", "bytes per slot",
               "create", "attach", "attach (other process)"]
    rows = []
    for m in memory["per_mode"]:
        rows.append([f"value_size={m['value_size']}", f"{m['bytes_per_session']:.1f}",
                     f"{m['size_over_capacity']:.2f} (capacity {m['capacity']:,})",
                     f"{m['bytes_per_slot']:.0f}", "", "", ""])
    for b in memory["big"]:
        other = b["attach_other_process_s"]
        rows.append([f"value_size={b['value_size']}, capacity {b['capacity']:,} "
                     f"({b['size_bytes'] / 2**20:,.0f} MiB)", "",
                     f"{b['size_bytes'] / b['capacity']:.2f}", "",
                     f"{b['create_s'] * 1000:.1f} ms", f"{b['attach_s'] * 1000:.2f} ms",
                     f"{other * 1000:.2f} ms" if finite(other) else str(other)])
    for v in memory.get("values", []):
        rows.append([f"value_size=4096, per {v['codec']} Session stored "
                     f"({v['encoded_bytes']} B encoded)", f"{v['bytes_per_session']:.1f} "
                     f"(+{v['over_encoding']:.1f} over its encoding)", "", "", "", "", ""])
    return ("Memory: shared memory reserved per session of capacity (one more session's "
            "cost, and the whole segment over its capacity: the table, reserved when the "
            "segment is made), and what each stored session adds in value mode (the arena, "
            "reserved as values fill it)", headers, rows)


def targets_table(targets: list[dict[str, Any]]) -> Table:
    headers = ["target", "limit", "measured", "met", "why, if missed"]
    rows = []
    for t in targets:
        unit = t["unit"]
        digits = t.get("digits", 2 if unit == "x" else 1)
        figs = ", ".join(
            f"{k} {v:.{digits}f}{unit}" for k, v in t["figures"].items()
        ) or "not measured"
        ctx = ", ".join(f"{k} {v:.{digits}f}{unit}" for k, v in t.get("context", {}).items()
                        if finite(v))
        if ctx:
            figs += f" (for comparison: {ctx})"
        met = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        rows.append([t["name"], f"{t['cmp']} {t['limit']:g}{unit}", figs, met,
                     t.get("why", "")])
    return ("Targets (issues 4, 11 and 15)", headers, rows)


def all_tables(result: dict[str, Any]) -> list[Table]:
    out = []
    if "single" in result:
        out += [single_table(result["single"]), other_table(result["single"])]
    if result.get("instructions", {}).get("variants"):
        out.append(instructions_table(result["instructions"]))
    if "multi" in result:
        out += [multi_table(result["multi"], w) for w in result["multi"]["workloads"]]
    if result.get("mix", {}).get("variants"):
        out.append(mix_table(result["mix"]))
    if "table" in result:
        out.append(table_table(result["table"]))
    if "e2e" in result and result["e2e"].get("backends"):
        out.append(e2e_table(result["e2e"]))
    if "memory" in result:
        out.append(memory_table(result["memory"]))
    if result.get("app", {}).get("caches"):
        out += [app_validations_table(result["app"]), app_load_table(result["app"])]
    out.append(targets_table(result["targets"]))
    return out


def text(table: Table) -> str:
    title, headers, rows = table
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [title, "-" * min(len(title), 100)]
    for r in [headers, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def markdown(table: Table) -> str:
    title, headers, rows = table
    lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
