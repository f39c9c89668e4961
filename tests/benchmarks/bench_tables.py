"""Run a paper's ablation table on the built-in world: every row, paired seeds, paper beside ours.

    python tests/benchmarks/bench_tables.py --method rela --table "Table 2" --seeds 3 --steps 5000
    python tests/benchmarks/bench_tables.py --method magnet --table "Table 3a" --jobs 2
    python tests/benchmarks/bench_tables.py --method asda --table "Table 2" --rows "(a),(d)"

Each (row, seed) is one `train.py --method M --row "<table> <row>" --seed S --init <run>/init.pt`
run (the method file's TABLES say which switches and overrides make the row), trained for --steps
steps or --budget seconds and evaluated once, at the end, on the first --val-samples val
expressions.

Paired seeds: seed s gives every row the same data order (train.py's sampler is a function of
--seed and the epoch only) and the same initial weights for the parts the rows share. Every row
of the table is built with torch.manual_seed(s), the full model first (the row without ablations
or overrides, else the baseline row); a weight takes the value of the first model that has it
(same name and shape) where the row's own fresh init is drawn the same way: equal, or both random
(they change with the seed) with a similar mean and std. A row that zeroes, fixes or rescales a
weight on purpose keeps its own. The pretrained encoders are the same in every row anyway, and
train.py --init restarts the random stream from --seed after loading. Each run's folder holds
init.pt (its whole start) and init.json (the share of its weights that is paired). The baseline
row always runs (--rows or not), and it and the full model run first.

Verdict of a row against the table's baseline row: Δ_s = row_s - base_s for each seed s; mean Δ ±
std of Δ (sample std over the seeds). "as the paper": the sign of mean Δ is the paper's (the row's
paper number minus the baseline's) and |mean Δ| > std of Δ; "against the paper": the other sign,
|mean Δ| > std of Δ; "inside the spread": |mean Δ| <= std of Δ.

Beside the table's metric (--metric, by default the first one the baseline row's "paper" entry
names): the text-swap IoU (near 1 = the model ignores the expression), the method's diagnostics
(means of metrics.json's diag/*; --columns picks them), and a second table of mIoU by kind of
expression (bench_kinds.py on each run's last.pt, the same val expressions; mean over seeds).

--jobs N trains N runs side by side, each one train.py process with OMP_NUM_THREADS=1 and
--workers 0: N jobs use N cores and never oversubscribe (choose N <= the free cores; on a GPU add
`--extra --device cuda` and run several). With N > 1 each run's output goes to <run>/train.log.
Resumable across sessions: a run whose metrics.json exists is read back, not rerun, and its
per-kind numbers come from <run>/kinds.json (delete a run folder to redo the run); a run cut
short continues from its last.pt (train.py --resume, written every 5 minutes). The .pt files are
not committed (.gitignore); metrics.json, kinds.json, init.json, config.json and log.jsonl are,
so a later session reads a finished run back from a fresh clone.
Writes <out>/<method>_<table>.md (markdown) and .png (paper beside ours, paired differences) and
prints the markdown.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kinds  # noqa: E402  (mIoU by kind of expression)

import train  # noqa: E402
from train import row_flags, slug  # noqa: E402  (one spelling of a row's flags and folder)


def row_id(row: str) -> str:
    """The row's id, what --row and --rows take: "#3 w/o minimap" -> "#3"."""
    return row.split()[0]


def run_dir(out: str, method: str, table: str, row: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{method}-{slug(table)}-{slug(row_id(row))}-s{seed}"


def baseline_row(rows: dict) -> str:
    """The row the paper compares against ("baseline": True), else the first row."""
    return next((k for k, v in rows.items() if v.get("baseline")), next(iter(rows)))


def full_row(rows: dict) -> str:
    """The table's full model: its first built row without ablations or overrides, else the
    baseline row. Its weights come first in a seed's shared init."""
    built = {k: v for k, v in rows.items() if "skip" not in v}
    plain = [k for k, v in built.items() if not v.get("ablate") and not v.get("set")]
    return plain[0] if plain else baseline_row(built)


# ---- paired initial weights --------------------------------------------------------------------


PROBE = 10**6  # a second seed: a weight that changes with the seed is a random draw


def fresh_states(method: str, table: str, row: str, seeds: list[int], extra: list[str]):
    """The row's model as train.py builds it (the same Config, tied to the same tokenizer, the
    pretrained encoders loaded), one state_dict per seed: its random weights drawn after
    torch.manual_seed(seed)."""
    args = train.parse_args(["--method", method, "--row", f"{table} {row_id(row)}", *extra])
    module = importlib.import_module(method)
    args.dataset = args.dataset or ("gshapes" if method == "rela" else "shapes")
    recipe_name = args.recipe or ("demo" if args.dataset in train.SYNTHETIC else "paper")
    cfg, preset, _, _ = train.build_config(args, module, None, recipe_name, master=False)
    _, cfg = train.build_tokenizer(cfg, preset, module.TEXT_ENCODER)
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(module.build_model(cfg).state_dict())
    return states


def shares(own: torch.Tensor, own_random: bool, shared: torch.Tensor, shared_random: bool) -> bool:
    """Whether a row starts from the shared init of a weight instead of its own fresh one: the
    same shape and either equal (constants, the pretrained encoders) or both random draws (they
    change with the seed) that look alike (std within a factor 1.5, means within 4 standard
    errors). A deterministic value on one side (a zeroed gate, a prior bias, a sine grid) or a
    rescaled draw is the row's own choice and stays."""
    if own.shape != shared.shape or own.dtype != shared.dtype:
        return False
    if torch.equal(own, shared):
        return True
    if not (own_random and shared_random):
        return False
    if own.numel() < 16:
        return True  # too few values to compare two draws
    a, b = own.double(), shared.double()
    sa, sb = a.std().item(), b.std().item()
    close = abs(a.mean().item() - b.mean().item()) < 4 * max(sa, sb) * (2 / own.numel()) ** 0.5
    return min(sa, sb) > 0 and max(sa, sb) / min(sa, sb) < 1.5 and close


def paired_inits(method: str, table: str, rows: dict, seed: int, extra: list[str],
                 wanted: list[str]) -> dict[str, tuple[dict, dict]]:  # fmt: skip
    """{row: (its init state_dict, init.json's summary)} for the `wanted` rows of one seed.

    Every built row of the table contributes (the full model first, then the table's order), so
    that a row gets the same shared weights whichever rows a session runs. A weight is keyed by
    its name and shape (P=4 and P=10 differ in size): the first model that has it gives it."""
    full = full_row(rows)
    order = [full] + [k for k in rows if "skip" not in rows[k] and k != full]
    shared, own = {}, {}
    for row in order:
        try:
            state, probe = fresh_states(method, table, row, [seed, seed + PROBE], extra)
        except (OSError, RuntimeError, ValueError) as e:  # e.g. a row that needs a download
            if row in wanted:
                raise
            print(f"init: {row!r} not built here, it shares nothing ({type(e).__name__})")
            continue
        drawn = {k: not torch.equal(t, probe[k]) for k, t in state.items()}
        for name, t in state.items():
            shared.setdefault((name, tuple(t.shape)), (t, drawn[name]))
        if row in wanted:
            own[row] = state, drawn
    out = {}
    for row, (state, drawn) in own.items():
        init, kept = {}, []
        for name, t in state.items():
            s, s_drawn = shared[(name, tuple(t.shape))]
            init[name] = s if shares(t, drawn[name], s, s_drawn) else t
            if init[name] is not s:
                kept.append(name)
        numel = sum(t.numel() for t in state.values())
        mine = sum(state[k].numel() for k in kept)
        out[row] = init, {"seed": seed, "full_row": full, "numel": numel,
                          "paired_numel": numel - mine, "own_init": kept}  # fmt: skip
    return out


# ---- runs -------------------------------------------------------------------------------------


def train_command(method: str, table: str, row: str, seed: int, folder: Path, args) -> list[str]:
    length = ["--time-budget", str(args.budget), "--max-steps", "1000000"] if args.budget else []
    length = length or ["--max-steps", str(args.steps)]
    # One evaluation, at the end, on the first --val-samples val expressions (--extra may override).
    evaluate = ["--val-samples", str(args.val_samples), "--val-every", str(10**9)]
    # A run cut short (a session's end) left last.pt, written every 5 minutes: continue it exactly.
    resume = ["--resume", str(folder / "last.pt")] if (folder / "last.pt").is_file() else []
    return [sys.executable, "train.py", "--method", method, "--row", f"{table} {row_id(row)}",
            "--seed", str(seed), "--init", str(folder / "init.pt"), "--out", str(folder.parent),
            "--name", folder.name, "--workers", "0", "--ckpt-minutes", "5", *resume, *length,
            *evaluate, *args.extra]  # fmt: skip


def train_one(cmd: list[str], folder: Path, to_file: bool) -> str | None:
    """One training run (one core: OMP_NUM_THREADS=1, --workers 0). None, or why it failed."""
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if to_file:
        with open(folder / "train.log", "a") as log:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        rc = subprocess.run(cmd, cwd=ROOT, env=env)
    if rc.returncode:
        return f"{folder.name} exited with {rc.returncode}" + (
            f" (see {folder / 'train.log'})" if to_file else ""
        )
    return None


def kinds_of(folder: Path, n: int, metrics: dict) -> tuple[str, dict[str, list[float]]]:
    """(dataset, {kind: per-sample IoUs}) of a run's last.pt on the first n val expressions,
    cached in kinds.json for the run as it ended (its step and training time)."""
    cache = folder / "kinds.json"
    key = {"samples": n, "step": metrics["step"], "train_time_s": metrics["train_time_s"]}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["dataset"], stored["ious"]
    _, dataset, ious = bench_kinds.by_kind(str(folder), n)
    cache.write_text(json.dumps({"key": key, "dataset": dataset, "ious": ious}))
    return dataset, ious


def run_order(rows: dict, wanted: list[str]) -> list[str]:
    """The wanted rows, each once: the baseline and the full model first (the rows every other row
    is read against; one row when they coincide), then the table's order."""
    first = dict.fromkeys([baseline_row(rows), full_row(rows)])
    return [r for r in first if r in wanted] + [r for r in wanted if r not in first]


def run_table(method: str, table: str, rows: dict, wanted: list[str], args) -> dict:
    """{row: [{"metrics", "kinds"} per seed]}: trains what is missing (paired inits first)."""
    seeds = range(args.seeds)
    order = run_order(rows, wanted)
    folder = {(r, s): run_dir(args.out, method, table, r, s) for r in order for s in seeds}
    missing = [
        (r, s) for s in seeds for r in order if not (folder[r, s] / "metrics.json").is_file()
    ]
    for s in seeds:
        need = [r for r, t in missing if t == s and not (folder[r, s] / "init.pt").is_file()]
        if need:
            print(f"seed {s}: building the paired init of {', '.join(row_id(r) for r in need)}")
            for row, (state, summary) in paired_inits(method, table, rows, s, args.extra,
                                                      need).items():  # fmt: skip
                folder[row, s].mkdir(parents=True, exist_ok=True)
                (folder[row, s] / "init.json").write_text(json.dumps(summary, indent=2))
                train.save_atomic(state, folder[row, s] / "init.pt")
    for key in folder:
        if key not in missing:
            print(f"read back {folder[key] / 'metrics.json'}")
    jobs = [(train_command(method, table, *key, folder[key], args), folder[key]) for key in missing]
    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            errors = list(pool.map(lambda j: train_one(*j, to_file=True), jobs))
    else:
        errors = [train_one(*j, to_file=False) for j in jobs]
    errors = [e for e in errors if e]
    if errors:
        sys.exit(f"error: {len(errors)} run(s) failed: {'; '.join(errors)}")
    results = {}
    for row in order:
        results[row] = []
        for s in seeds:
            metrics = json.loads((folder[row, s] / "metrics.json").read_text())
            dataset, kinds = kinds_of(folder[row, s], args.val_samples, metrics)
            init = folder[row, s] / "init.json"
            init = json.loads(init.read_text()) if init.is_file() else None
            results[row].append({"metrics": metrics, "kinds": kinds, "dataset": dataset,
                                 "init": init})  # fmt: skip
    return {r: results[r] for r in wanted}


# ---- the verdict and the table ------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def verdict(row: list[float], base: list[float], paper_delta: float | None):
    """Paired difference of a row from the baseline over seeds (row[s] and base[s]: seed s).
    -> (mean Δ, std of Δ, verdict); seeds where either value is missing are left out."""
    d = [r - b for r, b in zip(row, base, strict=True) if np.isfinite(r) and np.isfinite(b)]
    if not d:
        return float("nan"), float("nan"), "no paired seed"
    mean = float(np.mean(d))
    if len(d) < 2:
        return mean, float("nan"), "one seed: no spread"
    std = float(np.std(d, ddof=1))
    if paper_delta is None:
        return mean, std, "no paper number"
    if abs(mean) <= std:
        return mean, std, "inside the spread"
    if paper_delta == 0:
        return mean, std, "outside the spread; the paper has no difference"
    same = np.sign(mean) == np.sign(paper_delta)
    return mean, std, "as the paper" if same else "against the paper"


def value(run: dict, key: str) -> float:
    """A run's val number in % (nan if the run does not log it)."""
    v = run["metrics"]["val"].get(key, float("nan"))
    return 100 * v if v is not None else float("nan")


def kinds_table(results: dict, rule: dict[str, list[float]]) -> str:
    """mIoU (%) by kind, mean over seeds, with the overall mIoU of the same expressions."""
    runs = [r["kinds"] for v in results.values() for r in v]
    kinds = [k for k in bench_kinds.KINDS if any(k in r for r in runs)]
    counts = {k: len(next(r[k] for r in runs if k in r)) for k in kinds}
    lines = ["| row | overall mIoU | " + " | ".join(f"{k} ({counts[k]})" for k in kinds) + " |",
             "|---" * (len(kinds) + 2) + "|"]  # fmt: skip

    def cells(per_seed: list[dict]) -> list[str]:
        overall = np.mean([np.mean([x for v in k.values() for x in v]) for k in per_seed])
        out = [f"{100 * overall:.1f}"]
        for k in kinds:
            ms = [np.mean(r[k]) for r in per_seed if r.get(k)]
            out.append(f"{100 * np.mean(ms):.1f}" if ms else "-")
        return out

    for row, runs in results.items():
        lines.append(f"| {row} | " + " | ".join(cells([r["kinds"] for r in runs])) + " |")
    lines.append("| segment every object (text-blind) | " + " | ".join(cells([rule])) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--table", required=True, help='a key of the method\'s TABLES, e.g. "Table 2"')
    p.add_argument(
        "--rows",
        default=None,
        help='comma-separated row ids, e.g. "#1,#2" (default: all); the baseline row always runs',
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, paired across rows")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    g.add_argument("--budget", type=float, default=None, help="training seconds per run instead")
    p.add_argument("--val-samples", type=int, default=300, help="val expressions (default 300)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one core each")
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
    p.add_argument(
        "--out",
        default="runs/tables",
        help="where runs/ and the tables go (the "
        "committed results: tests/benchmarks/results/tables)",
    )
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.seeds < 1:
        p.error("--jobs and --seeds take 1 or more")
    torch.set_num_threads(1)  # this process only builds inits and evaluates by kind

    tables = importlib.import_module(args.method).TABLES
    if args.table not in tables:
        p.error(f"{args.method} has no {args.table!r}; choose from {', '.join(tables)}")
    all_rows = tables[args.table]
    rows = all_rows
    base_key = baseline_row(all_rows)  # every verdict is read against it: always run
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(",")]
        unknown = [r for r in wanted if r not in {row_id(k) for k in all_rows}]
        if unknown:
            p.error(f"{args.table} has no row {unknown[0]!r}; its rows: "
                    f"{', '.join(row_id(k) for k in all_rows)}")  # fmt: skip
        rows = {k: v for k, v in rows.items() if row_id(k) in wanted or k == base_key}
    # Our metrics.json logs every metric the papers print (gIoU and cIoU too), under their names.
    metric = args.metric or next(iter(rows[base_key].get("paper", {"mIoU": None})))
    built = [k for k, v in rows.items() if "skip" not in v]
    results = run_table(args.method, args.table, all_rows, built, args)

    def stat(row, key):
        return mean_std([value(r, key) for r in results[row]])

    # Diagnostics shown: --columns, or all but per-group breakdowns ("layer4/ordinal").
    if args.columns:
        diag_keys = [f"diag/{c}" for c in args.columns.split(",")]
    else:
        logged = {k for runs in results.values() for k in runs[0]["metrics"]["val"]}
        diag_keys = sorted(k for k in logged if k.count("/") == 1)
    head = ["row", "flags", f"paper {metric}", f"ours {metric}", "paired Δ (ours)",
            "paper Δ", "verdict", "text-swap IoU"]  # fmt: skip
    lines = ["| " + " | ".join(head + [k.split("/", 1)[1] for k in diag_keys]) + " |"]
    lines.append("|---" * (len(head) + len(diag_keys)) + "|")
    base_paper = rows[base_key].get("paper", {}).get(metric)
    deltas = {}
    for row, spec in rows.items():
        paper = spec.get("paper", {}).get(metric)
        flags = "-" if "skip" in spec else row_flags(spec)
        cells = [row, flags, "-" if paper is None else f"{paper:.2f}"]
        if row not in results:
            cells += [f"not built: {spec['skip']}"] + ["-"] * (len(head) - 4 + len(diag_keys))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        m, s = stat(row, metric)
        cells.append(f"{m:.1f} ± {s:.1f}")
        if row == base_key or base_key not in results:
            cells += ["baseline" if row == base_key else "-", "-", "-"]
        else:
            paper_delta = None if paper is None or base_paper is None else paper - base_paper
            ours = [value(r, metric) for r in results[row]]
            base = [value(r, metric) for r in results[base_key]]
            dm, ds, word = verdict(ours, base, paper_delta)
            deltas[row] = (dm, ds)
            cells += [f"{dm:+.1f} ± {ds:.1f}",
                      "-" if paper_delta is None else f"{paper_delta:+.2f}", word]  # fmt: skip
        cells.append(f"{stat(row, 'text_swap_IoU')[0] / 100:.2f}")
        # A diagnostic the row's model does not have (e.g. LFR's R² without LFR) is "-".
        for k in diag_keys:
            has = any(np.isfinite(r["metrics"]["val"].get(k, np.nan)) for r in results[row])
            cells.append(f"{stat(row, k)[0] / 100:.3f}" if has else "-")
        lines.append("| " + " | ".join(cells) + " |")

    length = f"{args.budget:g} s" if args.budget else f"{args.steps} steps"
    title = (
        f"{args.method} {args.table} on the built-in world: {args.seeds} paired seeds, "
        f"{length} per run, {args.val_samples} val expressions; ours = {metric} (%)"
    )
    dataset = next(iter(results.values()))[0]["dataset"]
    rule = bench_kinds.every_object(dataset, args.val_samples)
    paired = []
    for row, runs in results.items():
        info = [r["init"] for r in runs if r["init"]]
        if info:
            share = np.mean([i["paired_numel"] / i["numel"] for i in info])
            paired.append(f"{row_id(row)} {100 * share:.1f}%")
    md = (f"{title}\n\n" + "\n".join(lines) + "\n\n"
          "Paired Δ: row minus baseline, seed by seed, mean ± std over seeds. Verdict: \"as the "
          "paper\" = the paper's sign and |mean Δ| > std of Δ.\n"
          f"Share of each row's weights that starts from the seed's shared init: "
          f"{', '.join(paired) or '-'} (full model: {row_id(full_row(all_rows))}).\n\n"
          f"mIoU (%) by kind of expression on {dataset} (bench_kinds.py on each run's last.pt, "
          f"mean over seeds; the count of each kind in brackets):\n\n"
          + kinds_table(results, rule) + "\n")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.method}_{slug(args.table)}"
    stem.with_suffix(".md").write_text(md)
    plot(rows, results, metric, stat, deltas, title, stem.with_suffix(".png"), base_key)
    print(md)
    return md


def plot(rows, results, metric, stat, deltas, title, path, base_key) -> None:
    """Left: the paper's number beside ours (mean ± std over seeds). Right: each row's paired
    difference from the baseline row, the paper's beside ours (error bar: the std of Δ over
    seeds, the spread the verdict uses), which is what an ablation table claims, free of the two
    worlds' different scales."""
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
        delta = [deltas.get(r, (0.0, 0.0))[0] for r in names]
        spread = [np.nan_to_num(deltas.get(r, (0.0, 0.0))[1]) for r in names]
        ax.bar(x - 0.2, paper - paper[b], 0.4, label="paper", color="0.7")
        ax.bar(x + 0.2, delta, 0.4, yerr=spread, capsize=3, label="ours (paired)")
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
