"""Every method's tiny preset trained for the same fixed CPU time budget, then evaluated.

    python tests/benchmarks/bench_train.py --budget 600          # all five, 10 min each
    python tests/benchmarks/bench_train.py --methods rela --budget 300

    python tests/benchmarks/bench_train.py --steps 5000         # the default demo of each method

Runs `train.py --method M --time-budget B` (or `--max-steps N`; rela on gshapes, the others on
shapes: the defaults of train.py), then prints one markdown table with the validation metrics, the
text-swap IoU (the prediction with the sample's own expression against another scene's: near 1 =
the model ignores the text) and the method's diagnostics, next to the text-blind baselines on the
same val split: "segment every object" (the union of all objects of the scene: what a model
that finds objects but ignores the expression can do), predict nothing, predict the whole image.
Results also go to --json.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402

KEYS = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "N-acc", "T-acc")


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["rela", "magnet", "m3dec", "asda", "cm_masksd"])
    p.add_argument("--budget", type=float, default=600, help="training seconds per method")
    p.add_argument("--steps", type=int, default=None, help="train N steps instead of --budget")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", default="runs/bench/results.json")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    args = p.parse_args()
    results = {}
    for method in args.methods:
        t0 = time.time()
        cmd = [
            sys.executable,
            "train.py",
            "--method",
            method,
            *(
                ["--max-steps", str(args.steps)]
                if args.steps
                else ["--time-budget", str(args.budget), "--max-steps", "100000"]
            ),
            "--out",
            args.out,
            "--name",
            method,
            *args.extra,
        ]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        summary = json.loads((ROOT / args.out / method / "metrics.json").read_text())
        summary["wall_s"] = time.time() - t0
        results[method] = summary
    datasets = {m: "gshapes" if m == "rela" else "shapes" for m in args.methods}
    base = {d: baselines(d, 500) for d in sorted(set(datasets.values()))}
    cols = KEYS + ("text_swap_IoU",)
    print("\n| method | data | steps | min | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 4) + "|")

    def fmt(m):
        return (
            " | ".join(f"{100 * m[k]:.1f}" if k in m else "-" for k in KEYS)
            + " | "
            + (f"{m['text_swap_IoU']:.2f}" if "text_swap_IoU" in m else "-")
        )

    for method, r in results.items():
        minutes = r["train_time_s"] / 60
        print(f"| {method} | {datasets[method]} | {r['step']} | {minutes:.1f} | {fmt(r['val'])} |")
    for d, rows in base.items():
        for name, m in rows.items():
            print(f"| {name} | {d} | - | - | {fmt(m)} |")
    for method, r in results.items():
        diag = {k.split("/", 1)[1]: round(v, 3) for k, v in r["val"].items() if "/" in k}
        print(f"{method} diagnostics: {diag}")
    Path(ROOT / args.json).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.json).write_text(json.dumps({"runs": results, "baselines": base}, indent=2))


if __name__ == "__main__":
    main()
