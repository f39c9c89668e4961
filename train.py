"""Train, evaluate and run any of the five methods. The only entry point of the repository.

    python train.py --method rela                      # tiny model, built-in gshapes world, CPU ok
    python train.py --method magnet --ablate no_mg     # one paper ablation
    python train.py --method rela --eval-only --resume runs/rela/best.pt
    python train.py --method rela --resume runs/rela/best.pt --predict cat.jpg --text "the cat"
    python train.py --method rela --dataset grefcoco --data-root data --batch-size 8  # paper, GPU
    torchrun --nproc_per_node 4 train.py --method magnet --dataset refcoco --data-root data

    python train.py --method rela --row "Table 2 #3"     # one row of a paper table (TABLES)
    python train.py --method rela --dataset grefcoco --recipe paper --help   # recipes below

Every method file exposes the same contract (see any of them): Config (paper() / tiny()),
build_model(cfg), model(images, input_ids, attention_mask, targets) -> {"mask_logits", "loss",
...}, ABLATIONS, TABLES (the paper's ablation rows), RECIPE (the paper's training recipe),
diagnostics(...) (the paper's mechanism, measured on an eval batch) and sample_extra(...) for the
pictures. This script only moves data, steps the optimizer, evaluates with common.RISMetrics (plus
the text-swap IoU: does the prediction change when the expression does?) and writes
runs/<name>/: config.json, log.jsonl, metrics.json, last.pt, best.pt, curves.png, samples.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402

# Loading an encoder prints a report of the weights a method adds on purpose (e.g. SwinBackbone's
# per-stage norms, as LAVT) and a progress bar: noise in a training log (tests/test_checkpoints.py
# checks which weights are missing).
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent
METHODS = ("magnet", "asda", "rela", "m3dec", "cm_masksd")
SYNTHETIC = ("shapes", "gshapes")


def fail(msg: str) -> None:
    """A mistake the user can fix: one clear line, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# The built-in world's recipe: short and the same for every method, so that the demo runs in
# minutes on a laptop. The papers' recipes are each method file's RECIPE (--recipe paper).
DEMO_RECIPE = {
    "optimizer": "adamw",
    "lr": 1e-3,  # the new layers; the pretrained tiny encoders get encoder_lr_factor x this
    # The encoders' lr factor is the paper's own (RECIPE: 1 for ReLA, MagNet, M3Dec, CM-MaskSD,
    # 0.1 for ASDA); random-init encoders learn at the full rate. A uniform 0.1 cost M3Dec 9 mIoU
    # points at 3000 steps (0.351 vs 0.440): encoders pretrained for minutes need to adapt.
    "weight_decay": 0.01,
    "schedule": "poly",
    "poly_power": 0.9,  # LAVT's poly decay
    "warmup": 100,
    "iterations": 5000,  # M3Dec: 0.440 at 3000 steps, 0.494 at 5000; every curve still rose at 3000
    "batch_size": 16,
    "grad_clip": 1.0,
    "frozen": (),
}


def describe_recipe(r: dict) -> str:
    """One line: the recipe a run would use."""
    length = f"{r['epochs']} epochs" if "epochs" in r else f"{r['iterations']} iterations"
    sched = r["schedule"]
    if sched == "poly":
        sched += f" {r.get('poly_power', 0.9)}"
    elif sched == "step":
        sched += f" x{r.get('gamma', 0.1)} at {tuple(r.get('milestones', ()))}"
    frozen = f", frozen {', '.join(r['frozen'])}" if r.get("frozen") else ""
    return (
        f"{r['optimizer']} lr {r['lr']:g} (encoders x{r.get('encoder_lr_factor', 1.0):g}), "
        f"wd {r.get('weight_decay', 0.0):g}, {sched}, warm-up {r.get('warmup', 0)}, {length}, "
        f"batch {r['batch_size']}, clip {r.get('grad_clip', 0.0):g}{frozen}"
    )


def row_flags(spec: dict) -> str:
    """The flags that build a TABLES row, as a user would type them."""
    parts = [f"--ablate {','.join(spec['ablate'])}"] if spec.get("ablate") else []
    parts += [f"--set {k}={v}" for k, v in spec.get("set", {}).items()]
    return " ".join(parts) or "(full model)"


def format_row_recipe(row_recipe: dict) -> str:
    """{"epochs": 10, "image_size": 320} -> "epochs 10, image_size 320"."""
    return ", ".join(f"{k} {v}" for k, v in row_recipe.items())


def describe_row(spec: dict) -> str:
    """One line: how a TABLES row is built, what the paper's row ran with, the paper's number."""
    if "skip" in spec:
        return f"not built: {spec['skip']}"
    paper = ", ".join(f"{k} {v}" for k, v in spec.get("paper", {}).items())
    ran = format_row_recipe(spec.get("recipe", {}))
    return (
        row_flags(spec)
        + (f"  (ran with {ran}; --recipe paper)" if ran else "")
        + (f"  [paper: {paper}]" if paper else "")
    )


# A TABLES row's "recipe" may name these besides RECIPE's keys: either length unit, and the
# Config's input size.
ROW_RECIPE_EXTRA = ("epochs", "iterations", "image_size")


def check_row_recipe(spec: dict, paper_recipe: dict, where: str) -> dict:
    """A row's "recipe" overrides, checked against the method's RECIPE keys."""
    row_recipe = dict(spec.get("recipe", {}))
    unknown = [k for k in row_recipe if k not in paper_recipe and k not in ROW_RECIPE_EXTRA]
    if unknown:
        fail(f"{where}: recipe key {unknown[0]!r} is neither a RECIPE key nor one of "
             f"{', '.join(ROW_RECIPE_EXTRA)}")  # fmt: skip
    return row_recipe


def apply_row_recipe(recipe: dict, row_recipe: dict) -> dict:
    """The paper recipe with a row's overrides (not image_size, a Config field). A row that
    gives its length in the other unit replaces the recipe's length."""
    recipe = dict(recipe)
    if "epochs" in row_recipe or "iterations" in row_recipe:
        recipe.pop("epochs", None)
        recipe.pop("iterations", None)
    recipe.update({k: v for k, v in row_recipe.items() if k != "image_size"})
    return recipe


def slug(text: str) -> str:
    """A row or table name as a folder name: "Table 2 #3" -> "Table_2_3"."""
    return re.sub(r"[^A-Za-z0-9=.+-]+", "_", text).strip("_")


def find_row(tables: dict, row: str) -> tuple[str, str, dict]:
    """--row "Table 2 #3" -> ("Table 2", "#3 no minimap", spec). Row keys start with their id."""
    for table in sorted(tables, key=len, reverse=True):  # "Table 3a" before "Table 3"
        if row.startswith(table + " "):
            rid = row[len(table) + 1 :].strip()
            for key, spec in tables[table].items():
                if key == rid or key.split()[0] == rid:
                    return table, key, spec
    listing = "; ".join(f"{t} {k.split()[0]}" for t, rows in tables.items() for k in rows)
    fail(f"unknown row {row!r}; choose from: {listing}")


def lr_factor(step: int, warmup: int, progress: float, recipe: dict) -> float:
    """Linear warm-up over `warmup` steps, then the recipe's decay as a function of progress
    (0 -> 1 over the run: steps, or the clock under --time-budget)."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    schedule = recipe["schedule"]
    if schedule == "poly":  # LAVT, ReLA, MagNet
        return (1.0 - p) ** recipe.get("poly_power", 0.9)
    if schedule == "cosine":  # CM-MaskSD
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "step":  # milestones in the unit of the length, as fractions of it
        length = recipe.get("epochs", recipe.get("iterations"))
        passed = sum(p >= m / length for m in recipe.get("milestones", ()))
        return recipe.get("gamma", 0.1) ** passed
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def swap_partners(image_ids: list[int]) -> list[int]:
    """For each sample, the next one in the batch (cyclically) that shows another image; -1 if
    none. Its expression is "another scene's expression" for the text-swap test."""
    n = len(image_ids)
    partners = []
    for i in range(n):
        js = [(i + k) % n for k in range(1, n) if image_ids[(i + k) % n] != image_ids[i]]
        partners.append(js[0] if js else -1)
    return partners


def fused_supported(device: torch.device) -> bool:
    """Whether torch has fused Adam / AdamW kernels for this device: CUDA, and CPU in torch 2.4+."""
    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    return device.type == "cuda" or (device.type == "cpu" and version >= (2, 4))


def build_optimizer(
    model: torch.nn.Module, recipe: dict, device: torch.device, warn: bool = True
) -> tuple[torch.optim.Optimizer, list]:
    """The recipe's optimizer: its frozen parts frozen, the Hugging Face encoders at lr x
    recipe["encoder_lr_factor"], every other parameter at lr. Returns (optimizer, the parameters
    it trains). `warn`: print when a frozen prefix names nothing (rank 0 only under DDP)."""
    for prefix in recipe.get("frozen", ()):  # the recipe's frozen parts (e.g. BERT's embeddings)
        hits = [p for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        if not hits and warn:
            print(f"warning: the recipe freezes {prefix!r}, which this model does not have")
        for p in hits:
            p.requires_grad_(False)
    lr = recipe["lr"]
    # The Hugging Face encoders (pretrained, as in every paper) get a smaller lr than new layers.
    enc_ids = {
        id(p) for m in model.modules() if isinstance(m, PreTrainedModel) for p in m.parameters()
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in enc_ids], "lr": lr * recipe["encoder_lr_factor"]},
        {"params": [p for p in params if id(p) not in enc_ids], "lr": lr},
    ]
    wd = recipe.get("weight_decay", 0.0)
    # Fused Adam(W): one kernel updates every parameter of a group (no per-tensor Python loop,
    # fewer passes over memory), and the step count stays on the device, so the step reads no
    # value back to the host. CUDA has it; CPU since torch 2.4, so CPU runs and tests take the
    # same path as GPU runs. The update is the same up to float rounding (tests/test_train.py).
    fused = {"fused": True} if fused_supported(device) else {}
    if recipe["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **fused)
    elif recipe["optimizer"] == "adam":  # the papers' Adam: weight decay as an L2 term
        optimizer = torch.optim.Adam(groups, lr=lr, weight_decay=wd, **fused)
    elif recipe["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd)
    else:
        fail(f"recipe optimizer {recipe['optimizer']!r}: choose adamw, adam or sgd")
    return optimizer, params


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--method", required=True, choices=METHODS)
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=None,
        choices=data.DATASETS,
        help="default: gshapes for rela (it predicts no-target), shapes otherwise",
    )
    g.add_argument(
        "--data-root", default="data", help="root of the refer-API layout (default: data)"
    )
    g.add_argument("--split-by", default=None, help="unc / umd / google (default: the usual one)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument(
        "--val-samples",
        type=int,
        default=None,
        help="evaluate on the first N val expressions (default: all; synthetic: 500)",
    )
    g.add_argument(
        "--workers", type=int, default=None, help="loader workers (default: 1 CPU, 4 CUDA)"
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--preset",
        choices=("tiny", "paper"),
        default=None,
        help="default: tiny on shapes/gshapes, paper on real datasets",
    )
    g.add_argument(
        "--no-pretrained",
        action="store_true",
        help="paper architecture with random weights (no download)",
    )
    g.add_argument(
        "--row",
        default=None,
        metavar='"TABLE ID"',
        help='apply one row of a paper table, e.g. --row "Table 2 #3" (rows listed below)',
    )
    g.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="NAME",
        help="switch on a paper ablation (repeatable); listed below per method",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any Config field, e.g. --set P=5 (repeatable)",
    )
    g = p.add_argument_group(
        "optimisation",
        "A recipe sets them all (--recipe); any flag given here overrides the recipe's value.",
    )
    g.add_argument(
        "--recipe",
        choices=("paper", "demo"),
        default=None,
        help="paper = the method file's RECIPE (optimizer, lr, schedule, length, batch, clip, "
        "frozen parts; listed below), demo = the built-in world's short recipe "
        "(default: demo on shapes/gshapes, paper on real data)",
    )
    g.add_argument("--batch-size", type=int, default=None, help="per process")
    g.add_argument("--lr", type=float, default=None, help="learning rate of the new layers")
    g.add_argument(
        "--encoder-lr-mult",
        type=float,
        default=None,
        help="lr multiplier of the Hugging Face encoders (1 when they are random-init)",
    )
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    g.add_argument("--grad-clip", type=float, default=None, help="max grad norm, 0 = off")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="training length in steps")
    g.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop training after this many seconds (the lr schedule follows the clock)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    g.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="autocast dtype (default: bf16 on CUDA, off on CPU)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--out",
        default=None,
        help="output root (default: runs; --predict writes beside its checkpoint)",
    )
    g.add_argument(
        "--name", default=None, help="run folder name (default: the method, or method-row)"
    )
    g.add_argument("--resume", default=None, metavar="CKPT", help="continue from a checkpoint")
    g.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start training from these weights (a state_dict, or a checkpoint's model; every "
        "name and shape must match) instead of a fresh init; the random stream then restarts "
        "from --seed, so runs with the same --seed see the same batches and dropout",
    )
    g.add_argument("--eval-only", action="store_true", help="evaluate --resume on --val-split")
    g.add_argument("--predict", default=None, metavar="IMAGE", help="segment --text in IMAGE")
    g.add_argument("--text", default=None, help="the expression for --predict")
    g.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="steps between evaluations (default: 500 on the built-in world, one epoch on real "
        "data, as LAVT and CRIS)",
    )
    g.add_argument(
        "--ckpt-minutes",
        type=float,
        default=30.0,
        help="also write last.pt every this many minutes, so a crash loses little (default: 30)",
    )
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument(
        "--run-steps",
        type=int,
        default=None,
        help="train at most N steps in this invocation, then save last.pt and stop "
        "(for jobs with a wall-clock limit: run again with --resume to continue)",
    )
    # List every method's switches, table rows and recipe in --help, read from the method files.
    lines = []
    for m in METHODS:
        module = importlib.import_module(m)
        lines += [f"  {m}:", "    ablations (--ablate NAME):"]
        lines += [f"      {k:22s} {v}" for k, v in module.ABLATIONS.items()]
        lines.append("    paper table rows (--row):")
        for table, rows in module.TABLES.items():
            for row, spec in rows.items():
                lines.append(f"      {table} {row}".ljust(46) + f" {describe_row(spec)}")
        lines.append("    paper recipe (--recipe paper): " + describe_recipe(module.RECIPE))
    p.epilog = "methods:\n" + "\n".join(lines)
    return p.parse_args(argv)


# Numeric flags and the least each accepts (argparse's own errors print the usage too).
AT_LEAST = {
    "max_steps": 1, "epochs": 1, "batch_size": 1, "val_every": 1, "log_every": 1, "run_steps": 1,
    "val_samples": 1, "warmup": 0, "workers": 0, "lr": 0.0, "encoder_lr_mult": 0.0,
    "weight_decay": 0.0, "grad_clip": 0.0,
}  # fmt: skip
ABOVE = {"time_budget": 0.0, "ckpt_minutes": 0.0}


def check_numbers(args: argparse.Namespace) -> None:
    """A negative or zero length, batch or interval is a typo, not a run that trains nothing."""
    for name, low in {**AT_LEAST, **ABOVE}.items():
        value = getattr(args, name)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value):
            fail(f"{flag} {value}: expected a finite number")
        if name in ABOVE and value <= low:
            fail(f"{flag} {value}: expected a number above {low:g}")
        if name in AT_LEAST and value < low:
            fail(f"{flag} {value}: expected {low:g} or more")


def check_data_files(name: str, root: str, split_by: str | None) -> None:
    """A real dataset's files exist: checked before any tokenizer or encoder is loaded (the
    paper preset's come from the Hub), so a wrong --data-root is named, not a download error."""
    split_by = split_by or data.DEFAULT_SPLIT_BY[name]
    folder = Path(root) / name
    refs = f"grefs({split_by}).json" if name == "grefcoco" else f"refs({split_by}).p"
    images = Path(root) / "images" / "train2014"
    if not images.is_dir() and (Path(root) / "images/mscoco/images/train2014").is_dir():
        images = Path(root) / "images/mscoco/images/train2014"  # refer's original layout
    for path in (folder / refs, folder / "instances.json", images):
        if not path.exists():
            fail(f"{path} not found; {data.layout(name, split_by)}")


def parse_overrides(cfg, items: list[str]):
    """--set FIELD=VALUE, parsed with the type of the field's current value."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            fail(f"--set {item!r}: expected FIELD=VALUE with FIELD in {sorted(fields)}")
        old = getattr(cfg, key)
        try:
            if isinstance(old, bool):
                value = {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
            elif isinstance(old, (int, float, str)):
                value = type(old)(raw)
            elif isinstance(old, (tuple, list)):
                kind = type(old[0]) if old else str
                value = type(old)(kind(v) for v in raw.split(",") if v)
            else:  # dicts (encoder configs) and None: JSON
                value = json.loads(raw)
        except (KeyError, ValueError, json.JSONDecodeError):
            fail(f"--set {item!r}: cannot read {raw!r} as {type(old).__name__}")
        changes[key] = value
    return dataclasses.replace(cfg, **changes)


def save_atomic(obj, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, method: str) -> dict:
    if not Path(path).is_file():
        fail(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"{path} is not a checkpoint written by train.py ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        fail(f"{path} is not a checkpoint written by train.py")
    if ckpt["method"] != method:
        fail(f"{path} was trained with --method {ckpt['method']}, not {method}")
    # torch.compile prefixes parameter names with _orig_mod.
    ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return ckpt


def show_mask(ax, image: np.ndarray, mask: np.ndarray, color: str) -> None:
    """Draw an (H, W, 3) uint8 image with a boolean mask as a light tint and an outline.

    The synthetic world's objects are red, green, blue...: a colour fill alone would hide them."""
    tinted = image.astype(np.float32)
    tinted[mask] = 0.6 * tinted[mask] + 0.4 * 255
    ax.imshow(tinted.astype(np.uint8))
    if mask.any():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.5)
    ax.axis("off")


def binary_mask(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """(B, 1, h, w) mask logits at any stride -> (B, H, W) bool at `size` (bilinear, threshold)."""
    logits = F.interpolate(logits.float(), size=size, mode="bilinear")
    return logits[:, 0].sigmoid() > threshold


@torch.no_grad()
def evaluate(model, module, loader, cfg, device, amp_ctx, master: bool) -> dict:
    """The official metrics (common.RISMetrics), the text-swap test and the method's diagnostics.

    The forward gets the targets (in eval mode), so that a method can run and report the parts of
    its mechanism that only training uses (masked branches, grounding); the mask it predicts does
    not depend on them. Text swap: the same images with another scene's expression; text_swap_IoU
    is the IoU between the two predictions (1 = the model ignores the text), swap_mIoU scores the
    swapped prediction against the sample's own ground truth."""
    model.eval()
    # Prec@X as each family's official evaluation: CRIS / ASDA count IoU > X, LAVT / ReLA >= X.
    strict = module.TEXT_ENCODER == "clip"
    metrics, swapped = (common.RISMetrics(device, prec_strict=strict) for _ in range(2))
    # Sums and counts, so that DDP ranks merge exactly: text swap, val loss, diagnostics.
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(name: str, value: float, n: int) -> None:
        if not math.isnan(value):
            sums[name] = sums.get(name, 0.0) + value * n
            counts[name] = counts.get(name, 0.0) + n

    for batch in tqdm(
        loader, desc="eval", leave=False, disable=not master or not sys.stderr.isatty()
    ):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        images, masks, ids, am = (
            batch[k] for k in ("image", "mask", "input_ids", "attention_mask")
        )
        targets = {"masks": masks, "no_target": batch["no_target"]}
        with amp_ctx:
            out = model(images, ids, am, targets=targets)
        # A method with a no-target head also returns its mask before emptying it: the official
        # metric keeps that mask in the union when a targeted expression is rejected.
        logits = out.get("mask_logits_raw", out["mask_logits"])
        pred = binary_mask(logits, masks.shape[-2:], cfg.threshold)
        pred_nt = out["no_target_logits"] > 0 if "no_target_logits" in out else None
        metrics.update(pred, masks > 0.5, batch["no_target"], pred_nt)
        add("val_loss", float(out["loss"]), len(images))
        for k, v in module.diagnostics(out, batch).items():
            add(f"diag/{k}", float(v), len(images))

        partner = torch.tensor(swap_partners(batch["image_id"]), device=device)
        keep = partner >= 0
        if keep.any():
            j = partner[keep]
            with amp_ctx:
                out_s = model(images[keep], ids[j], am[j])
            own = binary_mask(out["mask_logits"][keep], masks.shape[-2:], cfg.threshold)
            other = binary_mask(out_s["mask_logits"], masks.shape[-2:], cfg.threshold)
            add("text_swap_IoU", common.mask_iou(own, other).mean().item(), int(keep.sum()))
            nt_s = out_s["no_target_logits"] > 0 if "no_target_logits" in out_s else None
            raw_s = out_s.get("mask_logits_raw", out_s["mask_logits"])
            raw_s = binary_mask(raw_s, masks.shape[-2:], cfg.threshold)
            swapped.update(raw_s, masks[keep] > 0.5, batch["no_target"][keep], nt_s)
    metrics.all_reduce()
    swapped.all_reduce()
    names = sorted(sums)
    if dist.is_available() and dist.is_initialized():
        # Every rank has the same names (the same method on the same kind of batches).
        t = torch.tensor([[sums[k], counts[k]] for k in names], device=device, dtype=torch.float64)
        dist.all_reduce(t)
        sums = {k: t[i, 0].item() for i, k in enumerate(names)}
        counts = {k: t[i, 1].item() for i, k in enumerate(names)}
    result = metrics.compute()
    result["swap_mIoU"] = swapped.compute()["mIoU"]
    result.update({k: sums[k] / counts[k] for k in names})
    model.train()
    return result


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")


@torch.no_grad()
def draw_samples(model, module, dataset, tokenizer, cfg, device, family, path, n=6) -> None:
    """samples.png: image+GT, prediction, the method's own panels; expression as title."""
    model.eval()
    # Spread over the split (its first items can all be of one kind, e.g. no-target).
    picks = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    batch = data.collate([dataset[int(i)] for i in picks])
    targets = {"masks": batch["mask"].to(device), "no_target": batch["no_target"].to(device)}
    out = model(
        batch["image"].to(device),
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        targets=targets,
    )
    pred = binary_mask(out["mask_logits"], batch["mask"].shape[-2:], cfg.threshold).cpu().numpy()
    # sample_extra gives one panel (map, caption[, (vmin, vmax)]) or a list of them.
    panels = []
    for i in range(len(pred)):
        extra = module.sample_extra(out, i, tokenizer)
        panels.append(extra if isinstance(extra, list) else [extra])
    cols = 2 + max(len(p) for p in panels)
    fig, axes = plt.subplots(len(pred), cols, figsize=(2.5 * cols, 2.6 * len(pred)), squeeze=False)
    for i, row in enumerate(axes):
        image = data.denormalize(batch["image"][i], family)
        show_mask(row[0], image, batch["mask"][i].numpy() > 0.5, "lime")
        row[0].set_title(textwrap.fill(f'"{batch["sentence"][i]}"', 40), fontsize=8)
        show_mask(row[1], image, pred[i], "cyan")
        row[1].set_title("prediction" + ("" if pred[i].any() else " (empty)"), fontsize=8)
        for ax, panel in zip(row[2:], panels[i] + [None] * cols, strict=False):
            ax.axis("off")
            if panel is None:
                continue
            extra, caption = panel[0], panel[1]
            vmin, vmax = panel[2] if len(panel) > 2 else (None, None)
            if extra is not None:
                shown = ax.imshow(extra, cmap="viridis", vmin=vmin, vmax=vmax)
                if vmin is not None:  # a fixed scale deserves its colour bar
                    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(textwrap.fill(caption, 40), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    model.train()


def plot_curves(log_path: Path, path: Path) -> None:
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    a.plot([r["step"] for r in val], [r["val"].get("val_loss") for r in val], "o-", label="val")
    a.set(xlabel="step", ylabel="loss", yscale="log")
    a.legend()
    for key in ("mIoU", "oIoU", "text_swap_IoU"):
        b.plot([r["step"] for r in val], [r["val"].get(key) for r in val], marker="o", label=key)
    b.set(xlabel="step", ylabel="val", ylim=(0, 1))
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# =============================================================================================
# The pieces of a run, in the order main() uses them
# =============================================================================================


@dataclasses.dataclass
class Processes:
    """This process among the run's processes (several under torchrun: DDP), and its device."""

    rank: int
    world: int  # number of processes
    ddp: bool
    device: torch.device
    workers: int  # DataLoader workers
    amp: str  # autocast dtype: "bf16", "fp16" or "off"
    amp_ctx: object  # the autocast context (a no-op when amp is off)

    @property
    def master(self) -> bool:  # rank 0 prints, logs and writes the run's files
        return self.rank == 0


def setup_processes(args: argparse.Namespace) -> Processes:
    """DDP under torchrun (one process per device), the device, CPU threads, seed, autocast."""
    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device} asked for, but CUDA is not available; use --device cpu")
    if ddp:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed + rank)
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 1)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # One compute thread per free core: more threads than cores (other ranks, loader
        # workers) make tiny models many times slower, not faster.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world - workers))
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    amp_ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    return Processes(rank, world, ddp, device, workers, amp, amp_ctx)


def build_config(args, module, ckpt: dict | None, recipe_name: str, master: bool):
    """The method's Config: the preset (or the checkpoint's), a --row's switches and overrides,
    then the user's --set and --ablate on top. Returns (cfg, preset, row_name, row_recipe)."""
    synthetic = args.dataset in SYNTHETIC
    if ckpt:  # the checkpoint's Config is the architecture (--set can still move the threshold)
        preset = ckpt["preset"]
        # A field added to Config after the checkpoint was saved takes its preset's value (the
        # behaviour the checkpoint was trained with), not the dataclass default (the paper's).
        base = module.Config.tiny() if preset == "tiny" else module.Config.paper()
        known = {f.name for f in dataclasses.fields(base)}
        cfg = dataclasses.replace(base, **{k: v for k, v in ckpt["config"].items() if k in known})
    else:
        preset = args.preset or ("tiny" if synthetic else "paper")
        cfg = module.Config.tiny() if preset == "tiny" else module.Config.paper()
        if args.no_pretrained:
            cfg = dataclasses.replace(cfg, pretrained=False)
    row_name, row_recipe = None, {}
    if args.row:  # a paper table row: its switches and overrides, then the user's flags on top
        table, key, spec = find_row(module.TABLES, args.row)
        if "skip" in spec:
            fail(f"{table} {key} is not built by {args.method}.py: {spec['skip']}")
        cfg = dataclasses.replace(cfg, **spec.get("set", {}))
        cfg = dataclasses.replace(
            cfg, ablate=tuple(dict.fromkeys(cfg.ablate + spec.get("ablate", ())))
        )
        row_name = slug(f"{table} {key.split()[0]}")
        row_recipe = check_row_recipe(spec, module.RECIPE, f"{table} {key}")
        if master:
            print(f"{table} {key}: {describe_row(spec)}")
            if row_recipe and recipe_name == "demo":
                print(f"{table} {key}: the paper's row ran with {format_row_recipe(row_recipe)}; "
                      "the demo keeps its recipe (--recipe paper applies them)")  # fmt: skip
        if recipe_name == "paper" and "image_size" in row_recipe:
            cfg = dataclasses.replace(cfg, image_size=row_recipe["image_size"])
    cfg = parse_overrides(cfg, args.set)
    if args.ablate:
        names = [n for item in args.ablate for n in item.split(",") if n]
        unknown = [n for n in names if n not in module.ABLATIONS]
        if unknown:
            fail(
                f"unknown ablation {unknown[0]!r} for {args.method}; "
                f"choose from {', '.join(module.ABLATIONS)}"
            )
        cfg = dataclasses.replace(cfg, ablate=tuple(dict.fromkeys(cfg.ablate + tuple(names))))
    return cfg, preset, row_name, row_recipe


def build_tokenizer(cfg, preset: str, family: str):
    """The text encoder's tokenizer, and the Config tied to it. Returns (tokenizer, cfg).

    The Hub's for the paper preset, the one saved with the demo's pretrained tiny encoder
    (pretrained/tiny-*) for the tiny preset, and the world's offline word-level tokenizer (the
    same vocabulary) for random-init tiny encoders."""
    tok_name = cfg.text_name if preset == "paper" or cfg.pretrained else None
    if tok_name and (ROOT / tok_name).is_dir():
        tok_name = str(ROOT / tok_name)
    try:
        tokenizer = data.build_tokenizer(family, tok_name)
    except (RuntimeError, OSError, ValueError) as e:
        fail(str(e))
    # Tie the text side of the model to the tokenizer (random-init encoders are sized to it).
    cfg = dataclasses.replace(cfg, vocab_size=len(tokenizer))
    if hasattr(cfg, "mask_token_id"):  # MagNet's Mask Grounding: [MASK] and the articles
        ids = tokenizer.convert_tokens_to_ids(["a", "an", "the"])
        articles = tuple(i for i in ids if i != tokenizer.unk_token_id)
        cfg = dataclasses.replace(cfg, mask_token_id=tokenizer.mask_token_id, article_ids=articles)
    return tokenizer, cfg


def build_recipe(args, module, cfg, recipe_name: str, row_recipe: dict, world: int):
    """The demo's recipe or the paper's (with a --row's), then the user's flags on top.
    Returns (recipe, batch size per process); the recipe's batch is the total over processes."""
    recipe = dict(DEMO_RECIPE if recipe_name == "demo" else module.RECIPE)
    if recipe_name == "demo":  # the paper's encoder lr factor, 1 for random-init encoders
        recipe["encoder_lr_factor"] = module.RECIPE["encoder_lr_factor"] if cfg.pretrained else 1.0
    else:  # what the paper's row ran with, where it differs from RECIPE (image_size: the Config)
        recipe = apply_row_recipe(recipe, row_recipe)
    flags = {"lr": args.lr, "encoder_lr_factor": args.encoder_lr_mult,
             "weight_decay": args.weight_decay, "grad_clip": args.grad_clip}  # fmt: skip
    recipe.update({k: v for k, v in flags.items() if v is not None})
    batch_size = args.batch_size or max(1, recipe["batch_size"] // world)
    recipe["batch_size"] = batch_size * world
    return recipe, batch_size


def build_datasets(args, cfg, tokenizer, family: str):
    """(val set, train set); None for what the run does not need (--predict, --eval-only)."""

    def dataset(split, num_samples=None):
        return data.build_dataset(
            args.dataset,
            split,
            tokenizer=tokenizer,
            family=family,
            image_size=cfg.image_size,
            max_tokens=cfg.max_tokens,
            root=args.data_root,
            split_by=args.split_by,
            num_samples=num_samples,
        )  # the world's own seed: same val set for every run

    synthetic = args.dataset in SYNTHETIC
    try:  # before the model: a bad file is reported before any encoder is loaded
        val_set = (
            None
            if args.predict
            else dataset(args.val_split, args.val_samples or (500 if synthetic else None))
        )
        train_set = None if args.eval_only or args.predict else dataset(args.train_split)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else repr(e))
    return val_set, train_set


def loader_options(batch_size: int, procs: Processes, seed: int) -> dict:
    return dict(
        batch_size=batch_size,
        num_workers=procs.workers,
        collate_fn=data.collate,
        pin_memory=procs.device.type == "cuda",
        persistent_workers=False,
        # Loaders draw their worker seeds from this generator, not from the global one, so
        # starting a loader never shifts the model's RNG stream (dropout, masking).
        generator=torch.Generator().manual_seed(seed + procs.rank),
    )


def load_init(path: str) -> dict:
    """--init: a state_dict, or the model of a checkpoint written by train.py."""
    if not Path(path).is_file():
        fail(f"--init weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"{path} is not a state_dict saved with torch.save ({type(e).__name__})")
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        fail(f"{path} is not a state_dict saved with torch.save")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_model(module, cfg, ckpt: dict | None, args) -> torch.nn.Module:
    """build_model(cfg), with the checkpoint's weights when resuming or the --init weights."""
    weights, source = (ckpt["model"], args.resume) if ckpt else (None, None)
    if args.init and not ckpt:
        weights, source = load_init(args.init), args.init
    try:
        # With the weights all there, build the architecture without loading the encoders'
        # pretrained weights (no download, works offline).
        model = module.build_model(dataclasses.replace(cfg, pretrained=False) if weights else cfg)
    except (RuntimeError, OSError, ValueError) as e:
        fail(str(e))
    if weights:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            fail(f"{source} does not fit this {args.method} model ({str(e).splitlines()[0]})")
    if args.init and not ckpt:
        # The random stream as if nothing had been built: every run with this --seed draws the
        # same dropout masks and noise whichever model it built (paired runs, bench_tables.py).
        torch.manual_seed(args.seed + int(os.environ.get("RANK", 0)))
    return model


def predict(args, model, cfg, tokenizer, family: str, procs: Processes, trained: bool) -> None:
    """--predict IMAGE --text "...": one image, one expression -> an overlay PNG."""
    if not trained:
        fail("--predict needs trained weights: add --resume runs/<name>/best.pt")
    if not args.text or not args.text.strip():
        fail('--predict needs a non-empty --text, e.g. --text "the red circle"')
    if not Path(args.predict).is_file():
        fail(f"image not found: {args.predict}")
    from PIL import Image

    try:
        with Image.open(args.predict) as im:
            pil = im.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        fail(f"{args.predict} is not a readable image ({type(e).__name__}: {e})")
    device = procs.device
    image = data.prepare_image(pil, cfg.image_size, family)[None].to(device)
    ids, am = data.encode_text(tokenizer, args.text, cfg.max_tokens)
    model.eval()
    with torch.no_grad(), procs.amp_ctx:
        out = model(image, ids[None].to(device), am[None].to(device))
    # A method with a no-target head has already emptied mask_logits when it fires.
    mask = binary_mask(out["mask_logits"], (pil.height, pil.width), cfg.threshold)[0]
    mask = mask.cpu().numpy()
    # Beside the checkpoint's run folder, unless --out / --name say where.
    run_dir = Path(args.out) / (args.name or args.method) if args.out else Path(args.resume).parent
    out_path = run_dir / f"{Path(args.predict).stem}_pred.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6 * pil.height / pil.width))
    show_mask(ax, np.asarray(pil), mask, "cyan")
    ax.set_title(f'"{args.text}"' + ("  (no target)" if not mask.any() else ""))
    fig.savefig(out_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out_path} ({int(mask.sum())} pixels selected)")


def evaluate_checkpoint(args, model, module, val_loader, cfg, procs: Processes, run_dir) -> None:
    """--eval-only: the metrics of --resume on --val-split, to eval_<split>.json."""
    metrics = evaluate(model, module, val_loader, cfg, procs.device, procs.amp_ctx, procs.master)
    if procs.master:
        print(format_metrics(metrics))
        # Not metrics.json: evaluating a checkpoint must not overwrite its training summary.
        out = run_dir / f"eval_{args.val_split}.json"
        out.write_text(json.dumps({"checkpoint": args.resume, "val": metrics}, indent=2))
        print(f"wrote {out}")


def training_length(args, recipe: dict, n_train: int, batch_size: int, world: int):
    """(steps per epoch, total steps, warm-up steps): the flags' length, else the recipe's."""
    steps_per_epoch = n_train // (batch_size * world)
    if steps_per_epoch == 0:
        fail(f"the training split has {n_train} samples, fewer than one batch per process")
    if args.max_steps:
        total = args.max_steps
    elif args.epochs:
        total = args.epochs * steps_per_epoch
    elif "epochs" in recipe:
        total = recipe["epochs"] * steps_per_epoch
    else:
        total = recipe["iterations"]
    unit = steps_per_epoch if "epochs" in recipe else 1  # the recipe's warm-up is in its unit
    warmup = args.warmup if args.warmup is not None else round(recipe.get("warmup", 0) * unit)
    return steps_per_epoch, total, warmup


def write_config(path: Path, args, preset: str, recipe: dict, row_recipe: dict, cfg) -> None:
    """config.json: the flags, the recipe as run and the Config as built."""
    path.write_text(
        json.dumps(
            {
                "args": vars(args),
                "preset": preset,
                "recipe": recipe,
                "row_recipe": row_recipe,
                "row_recipe_applied": bool(row_recipe) and recipe["name"] == "paper",
                "config": dataclasses.asdict(cfg),
            },
            indent=2,
        )  # fmt: skip
    )


def resume_training(ckpt: dict, optimizer, scheduler, scaler, rank: int) -> tuple[int, float]:
    """The optimizer, schedule, scaler and RNG where the checkpoint left them: (step, best)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return ckpt["step"], ckpt["best"]


def wrap_model(model, args, cfg, procs: Processes) -> torch.nn.Module:
    """torch.compile (--compile), then DDP under torchrun."""
    if args.compile:
        model = torch.compile(model)
    if procs.ddp:
        # Ablations may leave blocks unused on purpose; otherwise every parameter is used.
        model = DDP(
            model,
            device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
            find_unused_parameters=bool(cfg.ablate),
        )
    return model


def save_checkpoint(path: Path, step: int, best: float, *, meta: dict, model, optimizer,
                    scheduler, scaler, procs: Processes) -> None:  # fmt: skip
    """last.pt / best.pt, written atomically by rank 0, with every rank's RNG state so that a
    resumed run (DDP included) continues exactly. `meta`: method, preset, dataset, config."""
    rng = [torch.get_rng_state()]
    if procs.ddp:  # every rank's RNG, so that a resumed DDP run continues exactly
        rng = [torch.empty_like(rng[0]) for _ in range(procs.world)]
        dist.all_gather(rng, torch.get_rng_state())
    if procs.master:
        save_atomic(
            {
                **meta,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "best": best,
                "rng": rng,
            },
            path,
        )


def to_device(batch: dict, device: torch.device):
    """A training batch on the device: (images, input_ids, attention_mask, targets).
    Asynchronous copies (from pinned memory on CUDA): the host never waits for the last step."""
    images = batch["image"].to(device, non_blocking=True)
    ids = batch["input_ids"].to(device, non_blocking=True)
    am = batch["attention_mask"].to(device, non_blocking=True)
    targets = {
        "masks": batch["mask"].to(device, non_blocking=True),
        "no_target": batch["no_target"].to(device, non_blocking=True),
    }
    return images, ids, am, targets


def log_row(step: int, out: dict, lr: float, s_per_step: float) -> dict:
    """One log.jsonl line of training: the loss and its named terms (reads them off the device:
    only every --log-every steps)."""
    return {
        "step": step,
        "loss": out["loss"].item(),
        "lr": lr,
        **{k: float(torch.as_tensor(v).detach()) for k, v in out["losses"].items()},
        "s_per_step": s_per_step,
    }


def stop_or_save(args, procs: Processes, step: int, total: int, start_step: int, t_start: float,
                 t_saved: float) -> tuple[bool, bool]:  # fmt: skip
    """(done, save last.pt) after a step: the run's length, --time-budget, --run-steps (this
    invocation's share), --ckpt-minutes. Under DDP every rank must stop (and save) at the same
    step, even on a clock: the flags are all-reduced (a host sync, DDP only)."""
    out_of_time = args.time_budget and time.time() - t_start > args.time_budget
    paused = args.run_steps is not None and step - start_step >= args.run_steps
    done = step >= total or bool(out_of_time) or paused
    save = time.time() - t_saved > 60 * args.ckpt_minutes
    if procs.ddp:
        flags = torch.tensor([float(done), float(save)], device=procs.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        done, save = bool(flags[0].item()), bool(flags[1].item())
    return done, save


def weight_checksums(model, procs: Processes) -> list[float]:
    """Each rank's sum of its weights: a DDP run must end with the same weights on every rank."""
    checksum = torch.tensor(
        [sum(p.double().sum().item() for p in model.parameters())], device=procs.device
    )
    checksums = [checksum]
    if procs.ddp:
        checksums = [torch.empty_like(checksum) for _ in range(procs.world)]
        dist.all_gather(checksums, checksum)
    return [c.item() for c in checksums]


def main(argv=None) -> None:
    args = parse_args(argv)
    check_numbers(args)
    module = importlib.import_module(args.method)
    family = module.TEXT_ENCODER
    procs = setup_processes(args)
    device, master, amp_ctx = procs.device, procs.master, procs.amp_ctx

    # ---- config, tokenizer, recipe, data ----------------------------------------------------
    ckpt = load_checkpoint(args.resume, args.method) if args.resume else None
    args.dataset = args.dataset or (ckpt["dataset"] if ckpt else None)
    args.dataset = args.dataset or ("gshapes" if args.method == "rela" else "shapes")
    synthetic = args.dataset in SYNTHETIC
    if not synthetic and not args.predict:  # before any tokenizer: the paper's is the Hub's
        check_data_files(args.dataset, args.data_root, args.split_by)
    recipe_name = args.recipe or ("demo" if synthetic else "paper")
    cfg, preset, row_name, row_recipe = build_config(args, module, ckpt, recipe_name, master)
    tokenizer, cfg = build_tokenizer(cfg, preset, family)
    recipe, batch_size = build_recipe(args, module, cfg, recipe_name, row_recipe, procs.world)
    val_set, train_set = build_datasets(args, cfg, tokenizer, family)
    loader_kw = loader_options(batch_size, procs, args.seed)

    # ---- the model --------------------------------------------------------------------------
    model = load_model(module, cfg, ckpt, args).to(device)
    raw_model = model  # unwrapped, for saving and evaluation
    if args.predict:
        return predict(args, model, cfg, tokenizer, family, procs, trained=ckpt is not None)
    # Each rank evaluates its own slice of the val set; the metric sums are all-reduced.
    val_indices = list(range(procs.rank, len(val_set), procs.world))
    val_loader = DataLoader(val_set, sampler=val_indices, **loader_kw)
    run_dir = Path(args.out or "runs") / (
        args.name or row_name and f"{args.method}-{row_name}" or args.method
    )
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"{args.method} ({preset}) on {args.dataset}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"device {device}, {procs.world} process(es), run dir {run_dir}"
        )
    if args.eval_only:
        return evaluate_checkpoint(args, raw_model, module, val_loader, cfg, procs, run_dir)

    # ---- optimiser and schedule -------------------------------------------------------------
    optimizer, params = build_optimizer(model, recipe, device, warn=master)
    steps_per_epoch, total, warmup = training_length(
        args, recipe, len(train_set), batch_size, procs.world
    )
    recipe.update(name=recipe_name, total_steps=total, warmup_steps=warmup)
    val_every = args.val_every or (500 if synthetic else steps_per_epoch)
    if master:
        write_config(run_dir / "config.json", args, preset, recipe, row_recipe, cfg)
        print(f"recipe ({recipe_name}): {describe_recipe(recipe)}; {total} steps")
    t_start, step, best = time.time(), 0, -1.0

    def progress() -> float:  # fraction of the budget used: steps, or the clock if it is set
        p = step / total
        return max(p, (time.time() - t_start) / args.time_budget) if args.time_budget else p

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup, progress(), recipe)
    )
    scaler = torch.amp.GradScaler(enabled=procs.amp == "fp16")
    if ckpt:
        step, best = resume_training(ckpt, optimizer, scheduler, scaler, procs.rank)
    model = wrap_model(model, args, cfg, procs)
    meta = {"method": args.method, "preset": preset, "dataset": args.dataset,
            "config": dataclasses.asdict(cfg)}  # fmt: skip
    checkpoint = functools.partial(save_checkpoint, meta=meta, model=raw_model,
                                   optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                   procs=procs)  # fmt: skip

    # ---- the training loop ------------------------------------------------------------------
    # A resumed run continues its log; a fresh one starts a new log.
    log = open(run_dir / "log.jsonl", "a" if ckpt else "w") if master else None  # noqa: SIM115
    sampler = DistributedSampler(
        train_set, procs.world, procs.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    # In a log file (no terminal) a bar redrawn 10 times a second is noise: every 30 s instead.
    bar = tqdm(total=total, initial=step, desc=args.method, disable=not master,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # fmt: skip
    model.train()
    t_log, t_saved, done, metrics, start_step = time.time(), time.time(), step >= total, None, step
    while not done:
        # The epoch's order is a function of (seed, epoch), so a resumed run skips exactly the
        # batches it has already seen instead of replaying them.
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * batch_size : steps_per_epoch * batch_size]
        for batch in DataLoader(train_set, sampler=order, drop_last=True, **loader_kw):
            images, input_ids, attention_mask, targets = to_device(batch, device)
            with amp_ctx:
                out = model(images, input_ids, attention_mask, targets=targets)
            scaler.scale(out["loss"]).backward()
            if recipe["grad_clip"] > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            bar.update(1)

            if master and step % args.log_every == 0:  # the only host sync of a step
                row = log_row(step, out, scheduler.get_last_lr()[-1],
                              (time.time() - t_log) / args.log_every)  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
                t_log = time.time()
            done, save = stop_or_save(args, procs, step, total, start_step, t_start, t_saved)
            if step % val_every == 0 or done:
                metrics = evaluate(raw_model, module, val_loader, cfg, device, amp_ctx, master)
                if master:
                    log.write(json.dumps({"step": step, "val": metrics}) + "\n")
                    log.flush()
                    tqdm.write(f"step {step}: {format_metrics(metrics)}")
                if metrics["mIoU"] > best:
                    best = metrics["mIoU"]
                    checkpoint(run_dir / "best.pt", step, best)
                save = True
            if save:
                checkpoint(run_dir / "last.pt", step, best)
                t_saved = time.time()
            if done:
                break
    bar.close()
    if metrics is None:  # resumed at or past the end: nothing trained, still report
        metrics = evaluate(raw_model, module, val_loader, cfg, device, amp_ctx, master)

    # ---- wrap up ----------------------------------------------------------------------------
    checksums = weight_checksums(raw_model, procs)  # every rank
    if master:
        log.close()
        train_time = time.time() - t_start
        summary = {"val": metrics, "best_mIoU": best, "step": step, "train_time_s": train_time,
                   "ablate": list(cfg.ablate), "row": args.row, "recipe": recipe_name,
                   "weight_checksums": checksums}  # fmt: skip
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
        draw_samples(raw_model, module, val_set, tokenizer, cfg, device, family,
                     run_dir / "samples.png")  # fmt: skip
        print(
            f"done: {step} steps in {train_time / 60:.1f} min, val mIoU {metrics['mIoU']:.4f}, "
            f"oIoU {metrics['oIoU']:.4f}, "
            f"text-swap IoU {metrics.get('text_swap_IoU', math.nan):.3f}; outputs in {run_dir}"
        )
    if procs.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
