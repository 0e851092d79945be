"""PNG plots of a run (matplotlib, headless). Each function writes one file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import APP_VARIANTS, OP_NAMES
from .stats import finite


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def latency(single: dict[str, Any], path: Path) -> Path:
    """Median ns per call of each operation, every backend, p99 as a whisker (log scale)."""
    plt = _plt()
    rows = [r for r in single["backends"].values() if "ops" in r]
    fig, axes = plt.subplots(1, len(OP_NAMES), figsize=(19, 0.45 * len(rows) + 1.8),
                             sharey=True)
    labels = [r["label"] for r in rows]
    for ax, (op, name) in zip(axes, OP_NAMES.items(), strict=True):
        med = [r["ops"].get(op, {}).get("median", float("nan")) for r in rows]
        p99 = [r["ops"].get(op, {}).get("p99", float("nan")) for r in rows]
        err = [[0] * len(rows), [max(0.0, b - a) for a, b in zip(med, p99, strict=True)]]
        colors = ["#888888" if "InMemory" in lab else
                  "#1f77b4" if "shmcache" in lab else "#d62728" for lab in labels]
        ax.barh(range(len(rows)), med, xerr=err, color=colors, capsize=3)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("ns per call (median; whisker: p99)")
        for i, (v, top) in enumerate(zip(med, p99, strict=True)):
            if finite(v):  # beyond the whisker, so the two never overlap
                ax.text(max(v, top if finite(top) else v) * 1.15, i, f"{v:,.0f}",
                        va="center", fontsize=8)
        ax.set_xlim(right=max(x for x in p99 + med if finite(x)) * 12)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    fig.suptitle("SessionCache calls, one process (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(multi: dict[str, Any], path: Path) -> Path:
    """Per workload: aggregate throughput, the same as a multiple of 1 process beside the
    machine's own ceiling, and get tail latency, against the number of processes."""
    plt = _plt()
    workloads = multi["workloads"]
    fig, axes = plt.subplots(len(workloads), 3, figsize=(16, 4.2 * len(workloads)),
                             squeeze=False)
    colors = ["#888888", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"]
    machine = sorted((int(n), m["scaling"]) for n, m in multi["machine"].items())
    for (workload, rows), (ax_t, ax_s, ax_l) in zip(workloads.items(), axes, strict=True):
        for color, row in zip(colors, rows.values(), strict=False):
            counts = sorted((int(n), c) for n, c in row["counts"].items() if "latency" in c)
            if not counts:
                continue
            xs = [n for n, _ in counts]
            ax_t.plot(xs, [c["throughput"] / 1e3 for _, c in counts], "o-", color=color,
                      label=row["label"])
            ax_s.plot(xs, [c["scaling"] for _, c in counts], "o-", color=color,
                      label=row["label"])
            for p, style in (("median", ":"), ("p99", "--"), ("p999", "-")):
                ax_l.plot(xs, [c["latency"]["get"][p] for _, c in counts], style,
                          marker="o", color=color,
                          label=f"{row['label']}" if p == "p999" else None)
        ax_s.plot([n for n, _ in machine], [v for _, v in machine], "k--",
                  label="machine ceiling (empty loop)")
        ax_t.set_title(f"{workload} tokens: aggregate throughput (90/9/1)")
        ax_t.set_ylabel("thousand ops/s")
        ax_s.set_title(f"{workload} tokens: throughput / 1 process")
        ax_s.set_ylim(bottom=0)
        ax_l.set_title(f"{workload}: get latency (: p50, -- p99, — p99.9)")
        ax_l.set_ylabel("ns (log)")
        ax_l.set_yscale("log")
        for ax in (ax_t, ax_s, ax_l):
            ax.set_xlabel("processes (2 cores)")
            ax.set_xticks([1, 2, 4, 8])
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(tab: dict[str, Any], path: Path) -> Path:
    """Cost against load factor, and across churn."""
    plt = _plt()
    fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(12, 4))
    keys = {"get_miss": "get (miss)", "get_first_read": "get (first read)", "set": "set"}
    xs = [lv["fraction"] * 100 for lv in tab["levels"]]
    for k, name in keys.items():
        ax_l.plot(xs, [lv[k]["median"] for lv in tab["levels"]], "o-", label=name)
    ax_l.set_xlabel(f"% of capacity (at 100%, {tab['levels'][-1]['load_factor']:.0%} of the "
                    "slots are live)")
    ax_l.set_ylabel("ns per call (median)")
    ax_l.set_title(f"Cost against load (capacity {tab['capacity']:,})")
    ax_l.set_ylim(bottom=0)
    ax_l.legend()
    points = tab["churn"]["points"]
    cx = [p["ops"] / 1e6 for p in points]
    for k, name in keys.items():
        ax_c.plot(cx, [p[k]["median"] for p in points], "o-", label=name)
    ax_c.set_xlabel("million set/invalidate calls at capacity")
    ax_c.set_title(f"Cost under sustained churn at capacity "
                   f"({points[-1]['evictions']} evictions in {points[-1]['ops']:,} calls)")
    ax_c.set_ylim(bottom=0)
    ax_c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def e2e(data: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = [r for r in data["backends"].values() if "rps" in r]
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(12, 3.5))
    labels = [r["label"] for r in rows]
    ax_r.barh(labels, [r["rps"] for r in rows], color="#1f77b4")
    ax_r.set_xlabel("requests/s")
    ax_r.invert_yaxis()
    ax_r.set_title("gunicorn, 4 workers")
    for i, (p, name) in enumerate((("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"))):
        ax_l.barh([j + (i - 1) * 0.27 for j in range(len(rows))],
                  [r["latency_us"][p] / 1000 for r in rows], height=0.27, label=name)
    ax_l.set_yticks(range(len(rows)), labels)
    ax_l.invert_yaxis()
    ax_l.set_xlabel("latency (ms)")
    ax_l.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def app(data: dict[str, Any], path: Path) -> Path:
    """The real app: validations per 1000 requests, requests/s and stale acceptances, per
    cache, one bar per dependency x connection mode."""
    plt = _plt()
    rows = [r for r in data["caches"].values() if r.get("variants")]
    variants = [(d, m) for d, m in APP_VARIANTS if d in data["dependencies"]]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.9 * len(rows) + 2.2), sharey=True)
    height = 0.8 / len(variants)
    panels = (("validations_per_1000", "database validations per 1000 requests"),
              ("rps", "requests/s"),
              ("stale", "requests accepted after their logout returned"))
    for ax, (field, title) in zip(axes, panels, strict=True):
        for i, (d, m) in enumerate(variants):
            values = []
            for r in rows:
                v = r["variants"].get(d, {}).get(m)
                x = (v["stale"]["accepted_after_logout"] if field == "stale" else v[field]) \
                    if v is not None else float("nan")
                values.append(x if finite(x) else 0)
            ys = [j + (i - (len(variants) - 1) / 2) * height for j in range(len(rows))]
            ax.barh(ys, values, height=height, label=f"{d}, {data['modes'][m]}")
            for y, x in zip(ys, values, strict=True):
                ax.text(x, y, f" {x:,.0f}", va="center", fontsize=7)
        ax.set_title(title)
        if field == "stale":
            ax.set_xscale("symlog")
    axes[0].set_yticks(range(len(rows)), [r["label"] for r in rows])
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Real app: FastAPI under gunicorn, {data['users']} users, "
                 f"{data['logouts_per_round']} logouts per round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_all(result: dict[str, Any], out: Path) -> list[Path]:
    written = []
    if "single" in result:
        written.append(latency(result["single"], out / "latency.png"))
    if "multi" in result:
        written.append(scaling(result["multi"], out / "scaling.png"))
    if "table" in result:
        written.append(table(result["table"], out / "table.png"))
    if result.get("e2e", {}).get("backends"):
        written.append(e2e(result["e2e"], out / "e2e.png"))
    if result.get("app", {}).get("caches"):
        written.append(app(result["app"], out / "app.png"))
    return written
