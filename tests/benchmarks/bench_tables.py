"""Run a paper's ablation table on the built-in world: every row, several seeds, paper beside ours.

    python tests/benchmarks/bench_tables.py --method rela --table "Table 2" --seeds 3 --steps 600
    python tests/benchmarks/bench_tables.py --method magnet --table "Table 3a" --budget 120
    python tests/benchmarks/bench_tables.py --method asda --table "Table 2" --rows "(a),(d)"

Each (row, seed) is one `train.py --method M --row "<table> <row>" --seed S` run (the method file's
TABLES say which switches and overrides make the row), trained for --steps steps or --budget
seconds, one after the other on this machine's CPU or GPU, and evaluated once, at the end, on the
first --val-samples val expressions. A run whose metrics.json exists is read back, not rerun, so
an interrupted table continues where it stopped (delete the run folder to redo a run). Writes
<out>/<method>_<table>.md (the markdown table) and .png (bars with error bars, the paper's numbers
beside ours) and prints the table.

Columns: the row and the flags that make it; the paper's number for the table's metric (--metric,
by default the first metric of the baseline row's "paper" entry, e.g. oIoU); ours as mean ± std
over seeds (%); the text-swap IoU (near 1 = the model ignores the expression); the method's
diagnostics (means; --columns picks them); and "direction": whether our difference from the
table's baseline row has the paper's sign and exceeds the seed spread (|Δ| > the std of the
difference, sqrt(std_row² + std_base²)).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from train import row_flags, slug  # noqa: E402  (one spelling of a row's flags and folder)


def run_one(method, table, row, seed, args) -> dict:
    """One (row, seed) run, or its metrics read back if it has finished before."""
    name = f"{method}-{slug(table)}-{slug(row.split()[0])}-s{seed}"
    metrics_path = Path(args.out) / "runs" / name / "metrics.json"
    if metrics_path.is_file():
        print(f"read back {metrics_path}", flush=True)
        return json.loads(metrics_path.read_text())
    length = ["--time-budget", str(args.budget), "--max-steps", "1000000"] if args.budget else []
    length = length or ["--max-steps", str(args.steps)]
    # One evaluation, at the end, on the first --val-samples val expressions (--extra may override).
    evaluate = ["--val-samples", str(args.val_samples), "--val-every", str(10**9)]
    cmd = [sys.executable, "train.py", "--method", method, "--row", f"{table} {row.split()[0]}",
           "--seed", str(seed), "--out", str(Path(args.out) / "runs"), "--name", name,
           *length, *evaluate, *args.extra]  # fmt: skip
    print(" ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(metrics_path.read_text())


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--table", required=True, help='a key of the method\'s TABLES, e.g. "Table 2"')
    p.add_argument(
        "--rows", default=None, help='comma-separated row ids, e.g. "#1,#2" (default: all)'
    )
    p.add_argument("--seeds", type=int, default=3)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    g.add_argument("--budget", type=float, default=None, help="training seconds per run instead")
    p.add_argument("--val-samples", type=int, default=300, help="val expressions (default 300)")
    p.add_argument(
        "--metric",
        default=None,
        help="the paper's metric to compare, e.g. gIoU (default: the "
        "first one the baseline row reports)",
    )
    p.add_argument(
        "--columns",
        default=None,
        help="diagnostics to show, comma-separated (default: all but per-group breakdowns)",
    )
    p.add_argument("--out", default="runs/tables")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = p.parse_args(argv)

    tables = importlib.import_module(args.method).TABLES
    if args.table not in tables:
        p.error(f"{args.method} has no {args.table!r}; choose from {', '.join(tables)}")
    rows = tables[args.table]
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        rows = {k: v for k, v in rows.items() if k.split()[0] in wanted}
    base_key = next((k for k, v in rows.items() if v.get("baseline")), next(iter(rows)))
    # Our metrics.json logs every metric the papers print (gIoU and cIoU too), under their names.
    metric = args.metric or next(iter(rows[base_key].get("paper", {"mIoU": None})))

    results = {}
    for row, spec in rows.items():
        if "skip" in spec:
            continue
        results[row] = [run_one(args.method, args.table, row, s, args) for s in range(args.seeds)]

    def stat(row, key):
        values = [100 * r["val"][key] for r in results[row] if key in r["val"]]
        return mean_std([v for v in values if np.isfinite(v)])

    # Diagnostics shown: --columns, or all but per-group breakdowns ("layer4/ordinal").
    if args.columns:
        diag_keys = [f"diag/{c}" for c in args.columns.split(",")]
    else:
        logged = {k for runs in results.values() for k in runs[0]["val"]}
        diag_keys = sorted(k for k in logged if k.count("/") == 1)
    head = ["row", "flags", f"paper {metric}", f"ours {metric}", "text-swap IoU", "direction"]
    lines = ["| " + " | ".join(head + [k.split("/", 1)[1] for k in diag_keys]) + " |"]
    lines.append("|---" * (len(head) + len(diag_keys)) + "|")
    base_paper = rows[base_key].get("paper", {}).get(metric)
    for row, spec in rows.items():
        paper = spec.get("paper", {}).get(metric)
        flags = "-" if "skip" in spec else row_flags(spec)
        cells = [row, flags, "-" if paper is None else f"{paper:.2f}"]
        if row not in results:
            cells += [f"not built: {spec['skip']}", "-", "-"] + ["-"] * len(diag_keys)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        m, s = stat(row, metric)
        swap = stat(row, "text_swap_IoU")
        cells += [f"{m:.1f} ± {s:.1f}", f"{swap[0] / 100:.2f}"]
        if row == base_key or base_key not in results:
            cells.append("baseline" if row == base_key else "-")
        elif paper is None or base_paper is None:
            cells.append("no paper number")
        else:
            bm, bs = stat(base_key, metric)
            delta, paper_delta, spread = m - bm, paper - base_paper, float(np.hypot(s, bs))
            same_sign = np.sign(delta) == np.sign(paper_delta)
            verdict = "yes" if same_sign and abs(delta) > spread else "no"
            cells.append(f"{verdict} (Δ {delta:+.1f} vs paper {paper_delta:+.2f})")
        # A diagnostic the row's model does not have (e.g. LFR's R² without LFR) is "-".
        for k in diag_keys:
            has = any(np.isfinite(r["val"].get(k, np.nan)) for r in results[row])
            cells.append(f"{stat(row, k)[0] / 100:.3f}" if has else "-")
        lines.append("| " + " | ".join(cells) + " |")
    length = f"{args.budget:g} s" if args.budget else f"{args.steps} steps"
    title = (f"{args.method} {args.table} on the built-in world: {args.seeds} seeds, {length} "
             f"per run, {args.val_samples} val expressions; ours = {metric} (%)")  # fmt: skip
    md = f"{title}\n\n" + "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.method}_{slug(args.table)}"
    stem.with_suffix(".md").write_text(md)
    plot(rows, results, metric, stat, title, stem.with_suffix(".png"), base_key)
    print(md)
    return md


def plot(rows, results, metric, stat, title, path, base_key) -> None:
    """Left: the paper's number beside ours (mean ± std over seeds). Right: each row's difference
    from the baseline row, the paper's beside ours (error bar: the spread the verdict uses), which
    is what an ablation table claims, free of the two worlds' different scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r for r in rows if r in results]
    x = np.arange(len(names))
    ours = [stat(r, metric) for r in names]
    paper = np.array([rows[r].get("paper", {}).get(metric, np.nan) for r in names], dtype=float)
    labels = [r if len(r) < 18 else r[:17] + "…" for r in names]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * len(names) + 3, 3.8))
    ax = axes[0]
    ax.bar(x - 0.2, paper, 0.4, label=f"paper {metric}", color="0.7")
    ax.bar(x + 0.2, [m for m, _ in ours], 0.4, yerr=[s for _, s in ours], capsize=3,
           label=f"ours {metric} (built-in world)")  # fmt: skip
    ax.set(ylabel="%", title="value")
    ax.legend(fontsize=8)
    ax = axes[1]
    if base_key in results:
        b = names.index(base_key)
        bm, bs = ours[b]
        delta = [m - bm for m, _ in ours]
        spread = [float(np.hypot(s, bs)) if i != b else 0.0 for i, (_, s) in enumerate(ours)]
        ax.bar(x - 0.2, paper - paper[b], 0.4, label="paper", color="0.7")
        ax.bar(x + 0.2, delta, 0.4, yerr=spread, capsize=3, label="ours")
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)
    ax.set(ylabel="points", title="difference from the baseline row")
    for ax in axes:
        ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
