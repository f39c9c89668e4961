"""mIoU by kind of expression: which expressions a trained model reads, and which it does not.

    python tests/benchmarks/bench_kinds.py runs/magnet runs/m3dec runs/asda runs/cm_masksd runs/rela

Each argument is a train.py run directory (its last.pt: the final model, the one metrics.json and
the README's results describe) or a checkpoint; the method, dataset and Config come from the
checkpoint. The val expressions of the built-in world are grouped by the
kind the generator built (data.py's meanings): attribute ("the large red circle"), position
("the leftmost X", "the X at the top": the first along a direction), ordinal ("the second X from
the left"), relation ("the X left of the blue square"), and on gshapes also all, count, except,
and, none. Each run's mIoU per kind is printed next to the text-blind "segment every object" on
the same expressions: a kind where a model sits near that rule is a kind it does not read.
One markdown table per dataset; the numbers are per-sample IoU (gIoU's rule for no-target
samples, through common.RISMetrics), so "overall" is train.py's mIoU / gIoU on the same val set.
"""

import argparse
import importlib
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

KINDS = ("attribute", "position", "ordinal", "relation", "all", "count", "except", "and", "none")


def kind(scene: data.Scene) -> str:
    """The generator's kind of a val expression (see the module docstring)."""
    op = scene.meaning[0]
    if op == "ordinal":
        return "position" if scene.meaning[2] == 1 else "ordinal"
    return "attribute" if op == "the" else op


@torch.no_grad()
def by_kind(path: str, n: int, batch_size: int = 50) -> tuple[str, str, dict[str, list[float]]]:
    """-> (method, dataset, {kind: per-sample IoUs}) of one run on the first n val expressions."""
    path = Path(path)
    path = path / "last.pt" if path.is_dir() else path
    method = torch.load(path, map_location="cpu", weights_only=True)["method"]
    module = importlib.import_module(method)
    ckpt = train.load_checkpoint(str(path), method)
    cfg = module.Config(**ckpt["config"])
    name = cfg.text_name if cfg.pretrained else None  # as train.py picks the tokenizer
    name = str(ROOT / name) if name and (ROOT / name).is_dir() else name
    tokenizer = data.build_tokenizer(module.TEXT_ENCODER, name)
    val = data.build_dataset(ckpt["dataset"], "val", tokenizer=tokenizer,
                             family=module.TEXT_ENCODER, image_size=cfg.image_size,
                             max_tokens=cfg.max_tokens, num_samples=n)  # fmt: skip
    model = module.build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    ious = defaultdict(list)
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        batch = data.collate([val[i] for i in index])
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        pred = train.binary_mask(out["mask_logits"], batch["mask"].shape[-2:], cfg.threshold)
        pred_nt = out["no_target_logits"] > 0 if "no_target_logits" in out else None
        # train.py's per-sample IoU, no-target rules included (common.RISMetrics)
        iou = common.RISMetrics().update(pred, batch["mask"] > 0.5, batch["no_target"], pred_nt)
        for j, i in enumerate(index):
            ious[kind(val.scene(i))].append(iou[j].item())
    return method, ckpt["dataset"], ious


def every_object(dataset: str, n: int) -> dict[str, list[float]]:
    """The text-blind rule "segment every object" on the same val expressions, by kind."""
    tokenizer = data.build_tokenizer("bert", None)
    val = data.build_dataset(dataset, "val", tokenizer=tokenizer, family="bert", image_size=64,
                             max_tokens=20, num_samples=n)  # fmt: skip
    ious = defaultdict(list)
    for i in range(n):
        s = val[i]
        every = data.prepare_mask(val.scene(i).labels > 0, 64)[None] > 0.5  # (1, 64, 64)
        gt, nt = s["mask"][None] > 0.5, torch.tensor([s["no_target"]])
        ious[kind(val.scene(i))].append(common.RISMetrics().update(every, gt, nt).item())
    return ious


def table(rows: dict[str, dict[str, list[float]]]) -> str:
    """Markdown: one row per run, one column per kind present (mIoU in %, and the count)."""
    kinds = [k for k in KINDS if any(k in r for r in rows.values())]
    first = next(iter(rows.values()))
    head = " | ".join(f"{k} ({len(first[k])})" for k in kinds)
    lines = [f"| run | overall | {head} |", "|---" * (len(kinds) + 2) + "|"]
    for name, r in rows.items():
        every = [x for v in r.values() for x in v]
        cells = [f"{100 * sum(r[k]) / len(r[k]):.1f}" if r.get(k) else "-" for k in kinds]
        overall = 100 * sum(every) / len(every)
        lines.append(f"| {name} | {overall:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="train.py run directories (last.pt) or checkpoints")
    p.add_argument("--samples", type=int, default=500, help="val expressions (train.py: 500)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    per_dataset = defaultdict(dict)
    for run in args.runs:
        method, dataset, ious = by_kind(run, args.samples)
        per_dataset[dataset][f"{method} ({Path(run).name})"] = ious
    out = {}
    for dataset, rows in per_dataset.items():
        rows["segment every object"] = every_object(dataset, args.samples)
        out[dataset] = table(rows)
        print(f"\n{dataset}, {args.samples} val expressions, mIoU (%) by kind of expression:\n")
        print(out[dataset])
    return out


if __name__ == "__main__":
    main()
