"""Parameters and FLOPs per sample at the paper preset, random weights (no download).

    python tests/benchmarks/bench_cost.py                 # all five methods
    python tests/benchmarks/bench_cost.py --methods rela --train

FLOPs come from torch.utils.flop_counter (matmuls and convolutions; 1 multiply-add = 2 FLOPs) for
one sample (inference forward). With --train it also counts one training step (forward with
targets + backward), where the training-only branches run: MagNet's Mask Grounding and CM-MaskSD's
two masked self-distillation branches; their cost is the difference with the ablation switched on.
"""

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VOCAB = {"bert": 30522, "clip": 49408}  # bert-base-uncased, openai/clip-vit-base-patch16
# The training-only branch of a method and the ablation that removes it.
EXTRA_BRANCH = {"magnet": ("no_mg",), "cm_masksd": ("no_lmvsd", "no_vmlsd")}


def inputs(cfg, family, batch=1):
    """Random image, a 6-word expression padded to max_tokens, a square GT mask."""
    L, S = cfg.max_tokens, cfg.image_size
    ids = torch.zeros(batch, L, dtype=torch.long)
    am = torch.zeros(batch, L, dtype=torch.long)
    am[:, :8] = 1
    if family == "bert":  # [CLS] w1..w6 [SEP] [PAD]...
        ids[:, 1:7] = torch.randint(1000, 2000, (6,))
        ids[:, 0], ids[:, 7] = 101, 102
    else:  # <|startoftext|> w1..w6 <|endoftext|>, padded with <|endoftext|>
        ids[:] = 49407
        ids[:, 1:7] = torch.randint(1000, 2000, (6,))
        ids[:, 0] = 49406
    masks = torch.zeros(batch, S, S)
    masks[:, S // 4 : S // 2, S // 3 : S // 2] = 1
    targets = {"masks": masks, "no_target": torch.zeros(batch, dtype=torch.bool)}
    return torch.randn(batch, 3, S, S), ids, am, targets


def count(model, cfg, family, train: bool, batch: int = 2) -> tuple[float, float]:
    """(GFLOPs, seconds) per sample of an inference forward, or a training forward + backward.

    Batch 2, divided by 2: CM-MaskSD's CRIS neck has a BatchNorm1d, which cannot train on 1."""
    images, ids, am, targets = inputs(cfg, family, batch)
    model.train(train)
    flops = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with flops:
        if train:
            model(images, ids, am, targets=targets)["loss"].backward()
        else:
            # Grad mode stays on (same FLOPs): FlopCounterMode's module tracker fails under
            # no_grad when a parameter is passed straight into a submodule (rela's query_pos).
            model(images, ids, am)
    return flops.get_total_flops() / 1e9 / batch, (time.perf_counter() - t0) / batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", nargs="+", default=["magnet", "asda", "rela", "m3dec", "cm_masksd"])
    p.add_argument("--train", action="store_true", help="also count one training step")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {}
    for name in args.methods:
        module = importlib.import_module(name)
        cfg = dataclasses.replace(
            module.Config.paper(), pretrained=False, vocab_size=VOCAB[module.TEXT_ENCODER]
        )
        model = module.build_model(cfg)
        row = {
            "image_size": cfg.image_size,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        }
        row["infer_GFLOPs"], row["infer_cpu_s"] = count(model, cfg, module.TEXT_ENCODER, False)
        if args.train:
            row["train_GFLOPs"], row["train_cpu_s"] = count(model, cfg, module.TEXT_ENCODER, True)
            if name in EXTRA_BRANCH:
                # FLOPs do not depend on the weights: a fresh model with the branch ablated.
                plain = module.build_model(dataclasses.replace(cfg, ablate=EXTRA_BRANCH[name]))
                row["train_GFLOPs_main_only"], _ = count(plain, cfg, module.TEXT_ENCODER, True)
                row["train_flops_ratio"] = row["train_GFLOPs"] / row["train_GFLOPs_main_only"]
        results[name] = row
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                for k, v in row.items()}), flush=True)  # fmt: skip
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
