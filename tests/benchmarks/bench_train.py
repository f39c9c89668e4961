"""Every method's tiny preset trained for the same fixed CPU time budget, then evaluated.

    python tests/benchmarks/bench_train.py --budget 600          # all five, 10 min each
    python tests/benchmarks/bench_train.py --methods rela --budget 300

Runs `train.py --method M --time-budget B` (rela on gshapes, the others on shapes: the
defaults of train.py), then prints one markdown table with the validation metrics next to the
two trivial baselines (predict nothing / predict the whole image) on the same val split, and, for
ASDA, the histogram of the layers its selector picks on val. Results also go to --json.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import asda  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402

KEYS = ("mIoU", "oIoU", "Prec@0.5", "Prec@0.7", "N-acc", "T-acc")


def baselines(dataset: str, n: int) -> dict:
    """Metrics of predicting an empty mask / the whole image for every val expression."""
    tok = data.build_tokenizer("bert", None)
    val = data.build_dataset(
        dataset, "val", tokenizer=tok, family="bert", image_size=64, max_tokens=20, num_samples=n
    )
    empty, full = common.RISMetrics(), common.RISMetrics()
    for i in range(len(val)):
        s = val[i]
        gt, nt = s["mask"][None] > 0.5, torch.tensor([s["no_target"]])
        empty.update(torch.zeros_like(gt), gt, nt)
        full.update(torch.ones_like(gt), gt, nt)
    return {"predict nothing": empty.compute(), "predict everything": full.compute()}


@torch.no_grad()
def asda_layer_histogram(ckpt_path: Path, n: int) -> dict:
    """How often each candidate layer is selected on the val split (paper Fig. 5 analogue)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = asda.Config(**ckpt["config"])
    model = asda.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    tok = data.build_tokenizer("clip", None)
    val = data.build_dataset(
        ckpt["dataset"],
        "val",
        tokenizer=tok,
        family="clip",
        image_size=cfg.image_size,
        max_tokens=cfg.max_tokens,
        num_samples=n,
    )
    hist = collections.Counter()
    for start in range(0, len(val), 32):
        b = data.collate([val[i] for i in range(start, min(start + 32, len(val)))])
        out = model(b["image"], b["input_ids"], b["attention_mask"])
        for low, mid in out["selected_layers"].tolist():
            hist[f"low={low}"] += 1
            hist[f"mid={mid}"] += 1
    return dict(sorted(hist.items()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["rela", "magnet", "m3dec", "asda", "cm_masksd"])
    p.add_argument("--budget", type=float, default=600, help="training seconds per method")
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
            "--time-budget",
            str(args.budget),
            "--max-steps",
            "100000",
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
        if method == "asda":
            summary["selected_layers"] = asda_layer_histogram(
                ROOT / args.out / method / "last.pt", 500
            )
        results[method] = summary
    datasets = {m: "gshapes" if m == "rela" else "shapes" for m in args.methods}
    base = {d: baselines(d, 500) for d in sorted(set(datasets.values()))}
    print("\n| method | data | steps | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 3) + "|")
    fmt = lambda m: " | ".join(f"{100 * m[k]:.1f}" if k in m else "-" for k in KEYS)  # noqa: E731
    for method, r in results.items():
        print(f"| {method} | {datasets[method]} | {r['step']} | {fmt(r['val'])} |")
    for d, rows in base.items():
        for name, m in rows.items():
            print(f"| {name} | {d} | - | {fmt(m)} |")
    for method, r in results.items():
        if "selected_layers" in r:
            print(f"{method} selected layers on val: {r['selected_layers']}")
    Path(ROOT / args.json).parent.mkdir(parents=True, exist_ok=True)
    (ROOT / args.json).write_text(json.dumps({"runs": results, "baselines": base}, indent=2))


if __name__ == "__main__":
    main()
