"""The README's default-run table: every method's default demo, several seeds, one commit.

    python tests/benchmarks/bench_train.py --jobs 2             # 5 methods x 3 seeds, 5000 steps
    python tests/benchmarks/bench_train.py --clone /tmp/fresh --jobs 2    # a clean clone of HEAD
    python tests/benchmarks/bench_train.py --methods rela --seeds 3
    python tests/benchmarks/bench_train.py --budget 300 --seeds 1   # the same CPU time per run

Each (method, seed) is `train.py --method M --seed S` with the demo's defaults (rela on gshapes,
the others on shapes; 5000 steps, an evaluation every 500 on 500 val expressions), or --steps /
--budget instead of the length. The table gives, per method, the mean ± std over seeds of the
final validation metrics (mIoU = gIoU, oIoU = cIoU, Prec@0.5, N-acc on gshapes), the text-swap IoU
(the prediction with the sample's own expression against another scene's: near 1 = the model
ignores the text), the range of mIoU over the last --last evaluations of every seed (where a
student's run of the same commit should land) and the best mIoU, next to the text-blind rules
on the same val split: "segment every object" (the union of all objects of the scene: what a model
that finds objects but ignores the expression can do), predict nothing, predict the whole image.

--clone DIR runs train.py from a clean clone of this repository at HEAD (what a new user gets);
without it the runs use this checkout, and a tree with uncommitted changes is marked "dirty".
The commit (git rev-parse HEAD) of every run is recorded in its bench.json and in the output.
--jobs N trains N runs side by side, each one train.py process with OMP_NUM_THREADS=1 and
--workers 0: N jobs use N cores and never oversubscribe (choose N <= the free cores).
Resumable across sessions: a run whose metrics.json exists is read back, not rerun (delete its
folder <out>/runs/<method>-s<seed> to redo it). Writes <out>/default_runs.md and --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402

KEYS = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "N-acc", "T-acc")
METHODS = ("rela", "magnet", "m3dec", "asda", "cm_masksd")
# The table's columns: (metrics.json key, heading); N-acc only where a run logs it (gshapes).
COLUMNS = (("mIoU", "mIoU / gIoU"), ("oIoU", "oIoU / cIoU"), ("Prec@0.5", "Prec@0.5"),
           ("N-acc", "N-acc"))  # fmt: skip


def baselines(dataset: str, n: int) -> dict:
    """Text-blind rules on the val split: every object, nothing, the whole image."""
    tok = data.build_tokenizer("bert", None)
    val = data.build_dataset(
        dataset, "val", tokenizer=tok, family="bert", image_size=64, max_tokens=20, num_samples=n
    )
    rules = {"segment every object": common.RISMetrics(), "predict nothing": common.RISMetrics(),
             "predict everything": common.RISMetrics()}  # fmt: skip
    for i in range(len(val)):
        s = val[i]
        gt, nt = s["mask"][None] > 0.5, torch.tensor([s["no_target"]])
        every = data.prepare_mask(val.scene(i).labels > 0, 64)[None] > 0.5  # all objects
        rules["segment every object"].update(every, gt, nt)
        rules["predict nothing"].update(torch.zeros_like(gt), gt, nt)
        rules["predict everything"].update(torch.ones_like(gt), gt, nt)
    return {name: m.compute() for name, m in rules.items()}


# ---- the code the runs use ---------------------------------------------------------------------


def git(code: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def commit_of(code: Path) -> dict:
    """{"commit": HEAD, "dirty": tracked files changed} of the tree the runs use."""
    return {"commit": git(code, "rev-parse", "HEAD"),
            "dirty": bool(git(code, "status", "--porcelain", "--untracked-files=no"))}  # fmt: skip


def clean_clone(path: Path) -> Path:
    """A clone of this repository at HEAD (committed files only), made once and then reused."""
    head = git(ROOT, "rev-parse", "HEAD")
    if not path.exists():
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(path)], check=True)
        git(path, "checkout", "--quiet", head)
    if commit_of(path) != {"commit": head, "dirty": False}:
        sys.exit(f"error: {path} is not a clean clone at {head[:10]}: remove it or choose another")
    return path


# ---- runs -------------------------------------------------------------------------------------


def run_one(method: str, seed: int, folder: Path, code: Path, args, to_file: bool) -> str | None:
    """One default run (one core). None, or why it failed."""
    length = ["--max-steps", str(args.steps)] if args.steps else []
    if args.budget:
        length = ["--time-budget", str(args.budget), "--max-steps", "1000000"]
    cmd = [sys.executable, "train.py", "--method", method, "--seed", str(seed), "--out",
           str(folder.parent.resolve()), "--name", folder.name, "--workers", "0", *length,
           *args.extra]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps({**commit_of(code), "cmd": cmd[1:]}, indent=2))
    print(" ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    if to_file:
        with open(folder / "train.log", "w") as log:
            rc = subprocess.run(cmd, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        rc = subprocess.run(cmd, cwd=code, env=env)
    if rc.returncode:
        return f"{folder.name} exited with {rc.returncode}"
    info = json.loads((folder / "bench.json").read_text())
    (folder / "bench.json").write_text(json.dumps({**info, "wall_s": time.time() - t0}, indent=2))
    return None


# ---- the table ----------------------------------------------------------------------------------


def read_run(folder: Path, last: int) -> dict:
    """One finished run: metrics.json, the mIoU of its last `last` evaluations (log.jsonl),
    its dataset (config.json) and commit (bench.json)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    log = folder / "log.jsonl"
    evals = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    evals = [e["val"]["mIoU"] for e in evals if "val" in e]
    config = folder / "config.json"
    dataset = json.loads(config.read_text())["args"]["dataset"] if config.is_file() else None
    bench = folder / "bench.json"
    bench = json.loads(bench.read_text()) if bench.is_file() else {}
    return {"metrics": metrics, "last_mIoU": evals[-last:], "dataset": dataset,
            "commit": bench.get("commit", "unknown"), "dirty": bench.get("dirty")}  # fmt: skip


def mean_std(values) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(a) == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    """One method's runs (seeds) -> mean and std (ddof 1) of each final metric, text-swap IoU and
    best mIoU, the range of mIoU over every run's last evaluations, steps, minutes, commits."""
    val = [r["metrics"]["val"] for r in runs]
    out = {
        "seeds": len(runs),
        "dataset": runs[0]["dataset"],
        "steps": sorted({r["metrics"]["step"] for r in runs}),
        "minutes": mean_std([r["metrics"]["train_time_s"] / 60 for r in runs])[0],
        "commits": sorted({r["commit"] + ("+dirty" if r["dirty"] else "") for r in runs}),
    }
    for key in (*KEYS, "text_swap_IoU"):
        if any(key in v for v in val):
            out[key] = mean_std([v.get(key) for v in val])
    out["best_mIoU"] = mean_std([r["metrics"]["best_mIoU"] for r in runs])
    diag = sorted({k for v in val for k in v if k.startswith("diag/")})
    out["diagnostics"] = {k.split("/", 1)[1]: mean_std([v.get(k) for v in val])[0] for k in diag}
    last = [x for r in runs for x in r["last_mIoU"]]
    out["last_mIoU_range"] = (min(last), max(last)) if last else None
    out["last_evals"] = max((len(r["last_mIoU"]) for r in runs), default=0)
    return out


def markdown(summaries: dict[str, dict], rules: dict[str, dict], head: dict) -> str:
    """The README's table: methods (mean ± std over seeds) and the text-blind rules."""
    last = max((s["last_evals"] for s in summaries.values()), default=0)
    cols = [c for c in COLUMNS if any(c[0] in s for s in summaries.values())]
    names = ["method", "data", "seeds", "steps", *(h for _, h in cols), "text-swap IoU",
             f"mIoU, last {last} evaluations (min-max)", "best mIoU", "min / run"]  # fmt: skip
    lines = ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]

    def pm(s: dict, key: str, scale: float = 100, digits: int = 1) -> str:
        if key not in s or not np.isfinite(s[key][0]):
            return "-"
        m, sd = s[key]
        return f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"

    for method, s in summaries.items():
        lo_hi = s["last_mIoU_range"]
        span = f"{100 * lo_hi[0]:.1f}-{100 * lo_hi[1]:.1f}" if lo_hi else "-"
        steps = "/".join(str(x) for x in s["steps"])
        cells = [method, s["dataset"] or "-", str(s["seeds"]), steps,
                 *(pm(s, k) for k, _ in cols), pm(s, "text_swap_IoU", 1, 2), span,
                 pm(s, "best_mIoU"), f"{s['minutes']:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for (dataset, name), m in rules.items():
        cells = [
            f"{name} (text-blind)",
            dataset,
            "-",
            "-",
            *(f"{100 * m[k]:.1f}" if k in m else "-" for k, _ in cols),
            "-",
            "-",
            "-",
            "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    commits = sorted({c for s in summaries.values() for c in s["commits"]})
    several = " (runs from several commits)" if len(commits) > 1 else ""
    here = head["commit"] + ("+dirty" if head["dirty"] else "")
    note = f"Commit of the runs: {', '.join(commits)}{several}; this checkout: {here}."
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="train N steps (default: the demo's)")
    g.add_argument("--budget", type=float, default=None, help="training seconds per run instead")
    p.add_argument("--last", type=int, default=3, help="evaluations at the end for the range")
    p.add_argument(
        "--val-samples", type=int, default=500, help="val expressions of the text-blind rules"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs side by side, one core each")
    p.add_argument("--clone", default=None, metavar="DIR", help="run from a clean clone of HEAD")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", default=None, help="default: <out>/results.json")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = p.parse_args(argv)
    if args.jobs < 1 or args.seeds < 1 or args.last < 1:
        p.error("--jobs, --seeds and --last take 1 or more")
    torch.set_num_threads(1)
    code = clean_clone(Path(args.clone)) if args.clone else ROOT
    out = Path(args.out)
    folder = {(m, s): out / "runs" / f"{m}-s{s}" for m in args.methods for s in range(args.seeds)}
    missing = [key for key, f in folder.items() if not (f / "metrics.json").is_file()]
    for key in folder:
        if key not in missing:
            print(f"read back {folder[key] / 'metrics.json'}")
    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            errors = list(pool.map(lambda k: run_one(*k, folder[k], code, args, True), missing))
    else:
        errors = [run_one(*k, folder[k], code, args, False) for k in missing]
    errors = [e for e in errors if e]
    if errors:
        sys.exit(f"error: {len(errors)} run(s) failed: {'; '.join(errors)}")

    summaries = {}
    for m in args.methods:
        runs = [read_run(folder[m, s], args.last) for s in range(args.seeds)]
        default = "gshapes" if m == "rela" else "shapes"
        runs = [{**r, "dataset": r["dataset"] or default} for r in runs]
        summaries[m] = summarize(runs)
    datasets = sorted({s["dataset"] for s in summaries.values()})
    rules = {(d, name): v for d in datasets
             for name, v in baselines(d, args.val_samples).items()}  # fmt: skip
    md = markdown(summaries, rules, commit_of(code))
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_runs.md").write_text(md)
    path = Path(args.json) if args.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"summaries": summaries, "head": commit_of(code),
                                "baselines": {f"{d}/{n}": v for (d, n), v in rules.items()}},
                               indent=2))  # fmt: skip
    print(md)
    return md


if __name__ == "__main__":
    main()
