"""Every method on one GPU in one command: paper-preset training steps, batch, pipeline, demo.

    python tests/benchmarks/bench_gpu.py                          # CUDA, at most --budget-s 480
    python tests/benchmarks/bench_gpu.py --device cpu --dry-run   # every branch in seconds (a test)

Each method at its paper preset with random weights (Config.paper(), pretrained=False: no Hub),
trained on the synthetic world rendered at the paper's image size with the offline tokenizer
(ids mapped onto the paper vocabulary's size, so embeddings and MagNet's vocabulary head have the
paper's shapes), through train.py's own step: module.build_model, the loss of the forward,
train.build_optimizer with the method's RECIPE (fused AdamW / Adam on CUDA), bf16 autocast, the
recipe's gradient clipping. In order of what they tell (a rerun skips what the JSON already
holds, so a second call continues where the budget stopped the first):
  1. step/M/eager     step time, samples/s, peak memory, MFU (training FLOPs per sample from
                      torch.utils.flop_counter, bench_cost.py's counter, over / --peak-tflops)
  2. step/M/compile   the same with torch.compile (compile time, graph breaks)
  3. batch/M          the largest power-of-two batch that fits (eager; stops at the first OOM)
  4. pipeline         the RefCOCO loader reading a refer-format JPEG export of the world at 480 px
                      with train.py's default workers, against the models' consumption
  5. demo/M           100 steps of `train.py --method M` (the tiny demo) on this device
The paper schedules are extrapolated from the steps (hours = samples of the schedule / samples/s).
Writes results.json and results.md to --out. Measurements run in a child process that is
stopped at --budget-s, so the command always ends inside one 10-minute call; a measurement that
does not fit the time left is not started. --dry-run: tiny presets, batch 2, 2 steps, compile
(backend eager) for the first method only, one batch probe and a simulated OOM, an 8-image
export, 2 demo steps.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
METHODS = ("rela", "magnet", "m3dec", "asda", "cm_masksd")
# train.py's default world per method: ReLA predicts no-target, so it trains on gshapes.
WORLD = {m: "gshapes" if m == "rela" else "shapes" for m in METHODS}
# The paper's training set, for the schedules counted in epochs.
PAPER_DATA = {m: "grefcoco" if m == "rela" else "refcoco" for m in METHODS}
TRAIN_EXPRESSIONS = {
    # RefCOCO (unc) train: ASDA and CM-MaskSD §4.1 (../shared/reference/clip_family.md, "Counts").
    "refcoco": 120_624,
    # gRefCOCO train: the lead's figure, not found in ../shared (the GRES paper gives 278,232 over
    # all splits). Only informative: ReLA's recipe counts iterations.
    "grefcoco": 210_332,
}
# The tiny demo on 2 idle cores, s/step: README.md "Speed on 2 idle cores" (median over steps
# 41-200 of a 200-step run, one compute thread, one loader worker).
CPU_S_PER_STEP = {"rela": 0.156, "magnet": 0.251, "m3dec": 0.108, "asda": 0.126, "cm_masksd": 0.207}
# The tiny demo's val mIoU after 100 steps on the CPU (gIoU for ReLA; all 100 steps are the
# recipe's warm-up), seed 0, measured at commits d0701d1..b0eabc5 (tiny() is kept bitwise
# unchanged across refactors) with
#   OMP_NUM_THREADS=1 python train.py --method M --max-steps 100
CPU_MIOU_100 = {"rela": 0.2164, "magnet": 0.1518, "m3dec": 0.0, "asda": 0.2742, "cm_masksd": 0.0101}
DEFAULT_WORKERS = {"cuda": 4, "cpu": 1}  # train.py's --workers default
# Seconds a measurement may take on an H200 (guessed, not yet measured): none is started when
# less time than this is left.
ESTIMATE_S = {"step": 45, "compile": 150, "batch": 90, "pipeline": 60, "demo": 45}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu (default: cuda)")
    p.add_argument("--out", default=str(ROOT / "tests" / "benchmarks" / "results" / "gpu"),
                   help="results folder (default: tests/benchmarks/results/gpu)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=480, help="total seconds (default 480)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch", type=int, default=None, help="step batch (default 8; dry run 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; dry run 2)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="dense bf16 peak of the GPU for MFU (default 790: H200 SXM)",
    )
    p.add_argument("--max-batch", type=int, default=1024, help="batch search limit")
    p.add_argument("--compile-backend", default=None, help="default inductor; dry run eager")
    p.add_argument("--demo-steps", type=int, default=None, help="default 100; dry run 2")
    p.add_argument("--redo", action="append", default=[], metavar="GLOB",
                   help="measure the matching keys again, e.g. 'step/*/compile'")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="tiny presets, every branch, CPU ok")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--fake-oom-at", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = str(Path(args.out).resolve())  # the child runs in the repository root
    dry = args.dry_run
    args.batch = args.batch or (2 if dry else 8)
    args.steps = args.steps or (2 if dry else 10)
    args.warmup = 1 if dry else 3
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    args.demo_steps = args.demo_steps or (2 if dry else 100)
    if dry and args.fake_oom_at is None:
        args.fake_oom_at = 2 * args.batch  # the OOM branch runs on any device
    return args


def plan(args) -> list[str]:
    """The measurements in the order they are made: the most informative first."""
    ms = args.methods
    compiled = ms[:1] if args.dry_run else ms
    return (
        [f"step/{m}/eager" for m in ms]
        + [f"step/{m}/compile" for m in compiled]
        + [f"batch/{m}" for m in ms]
        + ["pipeline"]
        + [f"demo/{m}" for m in ms]
    )


def kind(key: str) -> str:
    return "compile" if key.endswith("/compile") else key.split("/")[0]


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"meta": {}, "results": {}}


def save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


# =============================================================================================
# The parent: plan, budget, the child process, the table
# =============================================================================================


def main(argv=None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return ""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device} asked for, but CUDA is not available; "
                 "use --device cpu --dry-run to check every branch on the CPU")  # fmt: skip
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    state = load(path)
    mode = "dry run" if args.dry_run else "full run"
    if state["results"] and state["meta"].get("mode", mode) != mode:
        sys.exit(f"error: {path} holds the results of a {state['meta']['mode']}; use another --out")
    for pattern in args.redo:
        for key in [k for k in state["results"] if fnmatch.fnmatch(k, pattern)]:
            del state["results"][key]
    state["meta"]["mode"] = mode
    save(path, state)
    pending = [k for k in plan(args) if k not in state["results"]]
    if pending:
        deadline = start + args.budget_s
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker"]
        cmd += ["--out", args.out, "--deadline", str(deadline)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # Its own process group: at the deadline it goes with its loader workers and compilers.
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        why = None
        try:
            child.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            why = f"stopped at the --budget-s limit ({args.budget_s:g} s)"
        finally:
            if child.poll() is None:  # the limit, or this process interrupted
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if why is None and child.returncode:
            why = f"the measuring process died (exit status {child.returncode})"
        if why:
            print(why)
            state = load(path)
            running = state["meta"].pop("running", None)
            if running:  # recorded as failed, so that a rerun moves on to the next one
                took = time.time() - running["since"]
                state["results"][running["key"]] = {"error": f"{why} after {took:.0f} s"}
            save(path, state)
    state = load(path)
    md = markdown(state, args)
    (out / "results.md").write_text(md)
    left = [k for k in plan(args) if k not in state["results"]]
    print(md)
    print(f"wrote {out / 'results.md'} and {path}" + (f"; {len(left)} measurement(s) left: "
          "run the same command again" if left else ""))  # fmt: skip
    return md


def fmt(v, spec: str = ".3g", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def cell(res: dict, key: str, field: str, spec: str = ".3g") -> str:
    r = res.get(key)
    if r is None:
        return "not measured"
    if "error" in r:
        return "error"
    return fmt(r.get(field), spec)


def schedule(method: str) -> tuple[str, int]:
    """(description, training samples) of the paper's recipe: epochs x the paper's training set,
    or the release's iterations x batch."""
    import importlib

    recipe = importlib.import_module(method).RECIPE
    if "epochs" in recipe:
        n = TRAIN_EXPRESSIONS[PAPER_DATA[method]]
        return f"{recipe['epochs']} epochs x {n:,} ({PAPER_DATA[method]})", recipe["epochs"] * n
    it, b = recipe["iterations"], recipe["batch_size"]
    return f"{it:,} iterations x batch {b}", it * b


def best_rate(res: dict, method: str) -> float | None:
    """The method's best measured training samples/s (eager or compiled)."""
    rates = [res.get(f"step/{method}/{k}", {}).get("samples_per_s") for k in ("eager", "compile")]
    return max((r for r in rates if r), default=None)


def markdown(state: dict, args) -> str:
    meta, res = state["meta"], state["results"]
    ms = args.methods
    lines = [
        f"# GPU benchmark ({meta.get('mode', '?')}): {meta.get('device_name', 'no device yet')}",
        "",
        f"torch {meta.get('torch', '?')}, CUDA {meta.get('cuda', '-')}, bf16 autocast, "
        f"peak {meta.get('peak_tflops', args.peak_tflops):g} TFLOP/s for MFU (--peak-tflops), "
        f"step batch {meta.get('batch', args.batch)}, presets: {meta.get('preset', '?')} with "
        "random weights, data: the synthetic world at the preset's image size. "
        "Command: `python tests/benchmarks/bench_gpu.py` (results.json holds every number).",
        "",
        "## Training step (train.py's step: build_optimizer from RECIPE, clip, fused AdamW/Adam)",
        "",
        "| method | input | params (M) | train GFLOPs/sample | mode | s/step | samples/s | "
        "peak GiB | MFU | compile s | graph breaks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ms:
        for mode in ("eager", "compile"):
            key = f"step/{m}/{mode}"
            if key not in plan(args):
                continue
            r = res.get(key, {})
            err = f" ({r['error'][:80]})" if "error" in r else ""
            lines.append(
                f"| {m} | {fmt(r.get('image_size'), 'd')} | {fmt(r.get('params_M'), '.1f')} | "
                f"{fmt(r.get('train_GFLOPs_per_sample'), '.1f')} | {mode}{err} | "
                f"{cell(res, key, 'step_s', '.4f')} | {cell(res, key, 'samples_per_s', '.1f')} | "
                f"{cell(res, key, 'peak_GiB', '.1f')} | {cell(res, key, 'mfu', '.1%')} | "
                f"{fmt(r.get('compile_s'), '.0f')} | {fmt(r.get('graph_breaks'), 'd')} |"
            )
    lines += ["", "## Largest power-of-two batch (eager, one training step per probe)", "",
              "| method | largest batch | peak GiB | samples/s at it | first OOM |",
              "|---|---|---|---|---|"]  # fmt: skip
    for m in ms:
        r = res.get(f"batch/{m}")
        if r is None or "error" in r:
            lines.append(f"| {m} | {'not measured' if r is None else 'error: ' + r['error'][:80]}"
                         " | | | |")  # fmt: skip
            continue
        oom = r.get("first_oom")
        lines.append(f"| {m} | {fmt(r['largest'], 'd')} | {fmt(r.get('peak_GiB'), '.1f')} | "
                     f"{fmt(r.get('samples_per_s'), '.1f')} | "
                     f"{'none up to ' + str(r['limit']) if oom is None else oom} |")  # fmt: skip
    lines += ["", "## One paper schedule on this one device, extrapolated", "",
              "| method | recipe length | samples | samples/s (best measured) | hours |",
              "|---|---|---|---|---|"]  # fmt: skip
    for m in ms:
        desc, n = schedule(m)
        rate = best_rate(res, m)
        hours = n / rate / 3600 if rate else None
        lines.append(f"| {m} | {desc} | {n:,} | {fmt(rate, '.1f')} | {fmt(hours, '.1f')} |")
    lines += [
        "",
        f"Training sets: RefCOCO train {TRAIN_EXPRESSIONS['refcoco']:,} expressions "
        "(ASDA / CM-MaskSD §4.1); gRefCOCO train "
        f"{TRAIN_EXPRESSIONS['grefcoco']:,} (unverified; ReLA's recipe counts iterations).",
    ]
    lines += ["", "## Input pipeline from files (RefCOCO loader, JPEG export of the world)", ""]
    r = res.get("pipeline")
    if r is None or "error" in r:
        lines.append("not measured" if r is None else f"error: {r['error']}")
    else:
        per_worker = r["single_process_samples_per_s"]
        lines += [
            f"{r['images']} images of {r['image_wh'][0]}x{r['image_wh'][1]} px (JPEG), read at "
            f"{r['image_size']} px, batch {r['batch']}: {r['samples_per_s']:.0f} samples/s with "
            f"{r['workers']} worker(s) (train.py's default), {per_worker:.0f} samples/s in one "
            "process.",
            "",
            "| method | model consumes (samples/s, best) | loader / model | workers needed |",
            "|---|---|---|---|",
        ]
        for m in ms:
            rate = best_rate(res, m)
            ratio = r["samples_per_s"] / rate if rate else None
            need = math.ceil(rate / per_worker) if rate and per_worker else None
            lines.append(f"| {m} | {fmt(rate, '.1f')} | {fmt(ratio, '.2f')} | {fmt(need, 'd')} |")
    lines += ["", f"## The default demo ({meta.get('demo_steps', args.demo_steps)} steps of "
              "`python train.py --method M`) against the CPU", "",
              "| method | s/step here | s/step CPU (README) | speed-up | val mIoU here | "
              "val mIoU CPU, 100 steps |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m in ms:
        r = res.get(f"demo/{m}")
        cpu = f"{CPU_S_PER_STEP[m]} |"
        if r is None or "error" in r:
            what = "not measured" if r is None else "error: " + r["error"][:80]
            lines.append(f"| {m} | {what} | {cpu} | | | {fmt(CPU_MIOU_100[m], '.3f')} |")
            continue
        speed = CPU_S_PER_STEP[m] / r["s_per_step"] if r.get("s_per_step") else None
        lines.append(f"| {m} | {fmt(r.get('s_per_step'), '.4f')} | {CPU_S_PER_STEP[m]} | "
                     f"{fmt(speed, '.1f')}x | {fmt(r.get('mIoU'), '.3f')} | "
                     f"{fmt(CPU_MIOU_100[m], '.3f')} |")  # fmt: skip
    errors = [f"- {k}: {v['error']}" for k, v in res.items() if "error" in v]
    if errors:
        lines += ["", "## Errors", "", *errors]
    return "\n".join(lines) + "\n"


# =============================================================================================
# The child: the measurements themselves
# =============================================================================================


def worker(args) -> None:
    import gc

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device} asked for, but CUDA is not available; "
                     "use --device cpu --dry-run")  # fmt: skip
        torch.cuda.set_device(device)
        # As train.py on CUDA.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    path = Path(args.out) / "results.json"
    state = load(path)
    state["meta"].update(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        peak_tflops=args.peak_tflops,
        batch=args.batch,
        preset="tiny" if args.dry_run else "paper",
        demo_steps=args.demo_steps,
    )
    save(path, state)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        for key in plan(args):
            state = load(path)
            if key in state["results"]:
                continue
            left = args.deadline - time.time()
            if not args.dry_run and left < ESTIMATE_S[kind(key)]:
                print(f"{key}: skipped, {left:.0f} s left (needs about {ESTIMATE_S[kind(key)]} s)")
                continue
            state["meta"]["running"] = {"key": key, "since": time.time()}
            save(path, state)
            t0 = time.time()
            print(f"{key} ...", flush=True)
            try:
                result = measure(key, args, device, work)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded, the next one runs
                result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            result["wall_s"] = round(time.time() - t0, 1)
            print(f"{key}: {json.dumps(result)}", flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            state = load(path)
            state["meta"].pop("running", None)
            state["results"][key] = result
            save(path, state)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(key: str, args, device, work: Path) -> dict:
    parts = key.split("/")
    if parts[0] == "step":
        return measure_step(parts[1], args, device, compiled=parts[2] == "compile")
    if parts[0] == "batch":
        return measure_batch(parts[1], args, device)
    if parts[0] == "pipeline":
        return measure_pipeline(args, device, work)
    return measure_demo(parts[1], args, device, work)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(method: str, args, device):
    """The method's preset with random weights, its model on the device, train.py's optimizer,
    one batch of the world at the preset's size on the device, and the training step."""
    import dataclasses
    import importlib

    import data
    import train

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import bench_cost

    module = importlib.import_module(method)
    cfg = module.Config.tiny() if args.dry_run else module.Config.paper()
    family = module.TEXT_ENCODER
    tokenizer = data.build_tokenizer(family, None)  # the offline one: no Hub here either
    V = bench_cost.VOCAB[family]  # the paper vocabulary's size: its embedding and heads
    cfg = dataclasses.replace(cfg, pretrained=False, vocab_size=V)
    if hasattr(cfg, "mask_token_id"):  # MagNet's Mask Grounding, as train.py sets it
        ids = tokenizer.convert_tokens_to_ids(["a", "an", "the"])
        articles = tuple(i for i in ids if i != tokenizer.unk_token_id)
        cfg = dataclasses.replace(cfg, mask_token_id=tokenizer.mask_token_id, article_ids=articles)
    torch.manual_seed(0)
    model = module.build_model(cfg).to(device).train()
    optimizer, params = train.build_optimizer(model, dict(module.RECIPE), device, warn=False)
    clip = module.RECIPE.get("grad_clip", 0.0)
    world = data.build_dataset(WORLD[method], "train", tokenizer=tokenizer, family=family,
                               image_size=cfg.image_size, max_tokens=cfg.max_tokens,
                               num_samples=args.batch)  # fmt: skip
    b = data.collate([world[i] for i in range(len(world))])
    ids = b["input_ids"]
    if family == "clip":  # CLIP's convention in the paper vocabulary: <sot> = V-2, <eot> = V-1
        ids = torch.where(ids == tokenizer.bos_token_id, V - 2, ids)
        ids = torch.where(ids == tokenizer.eos_token_id, V - 1, ids)
    batch = (b["image"].to(device), ids.to(device), b["attention_mask"].to(device),
             {"masks": b["mask"].to(device), "no_target": b["no_target"].to(device)})  # fmt: skip
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(net, images, input_ids, attention_mask, targets):
        with amp:
            out = net(images, input_ids, attention_mask, targets=targets)
        out["loss"].backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"].detach()

    return cfg, model, optimizer, batch, step


def tile(batch, n: int):
    """The batch repeated to n samples (memory does not depend on the content)."""
    images, ids, am, targets = batch
    k = math.ceil(n / len(images))

    def rep(x):
        return x.repeat(k, *([1] * (x.dim() - 1)))[:n]

    return rep(images), rep(ids), rep(am), {k_: rep(v) for k_, v in targets.items()}


def peak_gib(device):
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def measure_step(method: str, args, device, compiled: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model, optimizer, batch, step = setup(method, args, device)
    B = len(batch[0])
    row = {"image_size": cfg.image_size, "batch": B,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
    reset_peak(device)
    net = model
    if compiled:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        net = torch.compile(model, backend=args.compile_backend)
        t0 = time.perf_counter()
        step(net, *batch)
        sync(device)
        row["compile_s"] = time.perf_counter() - t0  # the first step: tracing and compiling
    else:
        # Training FLOPs of one forward + backward, counted as bench_cost.py counts them.
        flops = FlopCounterMode(display=False)
        with flops:
            step(net, *batch)
        row["train_GFLOPs_per_sample"] = flops.get_total_flops() / 1e9 / B
    for _ in range(args.warmup):
        step(net, *batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(net, *batch)
    sync(device)
    row["step_s"] = (time.perf_counter() - t0) / args.steps
    row["samples_per_s"] = B / row["step_s"]
    row["peak_GiB"] = peak_gib(device)
    row["loss"] = float(loss)
    if not math.isfinite(row["loss"]):
        raise FloatingPointError(f"loss {row['loss']} after {args.steps} steps")
    if compiled:
        breaks = torch._dynamo.utils.counters["graph_break"]
        row["graph_breaks"] = sum(breaks.values())
        row["graph_break_reasons"] = sorted(breaks)[:5]
        row["unique_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        # The FLOPs of the step do not change when it is compiled: the eager row's count.
        eager = load(Path(args.out) / "results.json")["results"].get(f"step/{method}/eager", {})
        row["train_GFLOPs_per_sample"] = eager.get("train_GFLOPs_per_sample")
    gflops = row["train_GFLOPs_per_sample"]
    row["mfu"] = gflops * 1e9 * row["samples_per_s"] / (args.peak_tflops * 1e12) if gflops else None
    return row


def measure_batch(method: str, args, device) -> dict:
    """Powers of two from 2 (CM-MaskSD's BatchNorm1d cannot train on one sample) until the first
    out-of-memory error; two steps per probe, the second timed."""
    import gc

    cfg, model, optimizer, batch, step = setup(method, args, device)
    probes, first_oom, b = [], None, 2
    while b <= args.max_batch:
        oom = False
        try:
            if args.fake_oom_at and b >= args.fake_oom_at:
                raise torch.OutOfMemoryError(f"simulated at batch {b} (--dry-run)")
            big = tile(batch, b)
            reset_peak(device)
            step(model, *big)
            sync(device)
            t0 = time.perf_counter()
            step(model, *big)
            sync(device)
            probes.append({"batch": b, "step_s": time.perf_counter() - t0,
                           "peak_GiB": peak_gib(device)})  # fmt: skip
        except torch.OutOfMemoryError:
            oom = True
        if oom:  # out of the except block: the traceback no longer holds the tensors
            first_oom = b
            big = None
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        b *= 2
    last = probes[-1] if probes else {}
    return {
        "largest": last.get("batch"),
        "peak_GiB": last.get("peak_GiB"),
        "samples_per_s": last["batch"] / last["step_s"] if probes else None,
        "first_oom": first_oom,
        "limit": args.max_batch,
        "probes": probes,
        "image_size": cfg.image_size,
    }


def export_jpeg_world(folder: Path, num: int) -> Path:
    """data.py's refer-format export of the world (shapes, train), then each 128 px PNG made a
    640 x 480 JPEG, COCO's usual size, with its masks as RLE at that size: what the loader reads
    for RefCOCO (decode, rasterise, resize, normalise, tokenise)."""
    import pickle

    import numpy as np
    from PIL import Image

    import data

    W, H = 640, 480
    refs_path = data.export_synthetic("shapes", folder, splits=("train",), num=num)
    inst_path = refs_path.parent / "instances.json"
    instances = json.loads(inst_path.read_text())
    image_dir = folder / "images" / "train2014"
    names = {}
    for img in instances["images"]:
        png = image_dir / img["file_name"]
        jpg = png.with_suffix(".jpg")
        with Image.open(png) as im:
            im.convert("RGB").resize((W, H), Image.Resampling.BILINEAR).save(jpg, quality=90)
        png.unlink()
        names[img["file_name"]] = jpg.name
        old_hw = (img["height"], img["width"])
        img.update(file_name=jpg.name, height=H, width=W, old_hw=old_hw)
    sizes = {img["id"]: img.pop("old_hw") for img in instances["images"]}
    for ann in instances["annotations"]:
        h, w = sizes[ann["image_id"]]
        mask = data.segmentation_to_mask(ann["segmentation"], h, w)
        big = Image.fromarray(mask).resize((W, H), Image.Resampling.NEAREST)
        ann["segmentation"] = data.mask_to_rle(np.asarray(big))
    inst_path.write_text(json.dumps(instances))
    refs = data.load_refs_pickle(refs_path)
    for ref in refs:
        ref["file_name"] = names[ref["file_name"]]
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f)
    return folder


def measure_pipeline(args, device, work: Path) -> dict:
    from torch.utils.data import DataLoader

    import data

    num, size = (8, 64) if args.dry_run else (512, 480)
    batch = 4 if args.dry_run else args.batch
    root = export_jpeg_world(work / "jpeg_world", num)
    tokenizer = data.build_tokenizer("bert", None)
    dataset = data.build_dataset("refcoco", "train", root=root, tokenizer=tokenizer,
                                 family="bert", image_size=size, max_tokens=20)  # fmt: skip

    def rate(workers: int) -> float:
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers,
                            collate_fn=data.collate, pin_memory=device.type == "cuda")  # fmt: skip
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t0, seen = time.perf_counter(), 0
        for b in it:
            seen += len(b["sentence"])
        return seen / (time.perf_counter() - t0)

    workers = DEFAULT_WORKERS[device.type]
    return {
        "images": num,
        "image_wh": [640, 480],
        "image_size": size,
        "batch": batch,
        "workers": workers,
        "samples_per_s": rate(workers),
        "single_process_samples_per_s": rate(0),
    }


def measure_demo(method: str, args, device, work: Path) -> dict:
    """`python train.py --method M --max-steps N` in this process; s/step is the median of the
    logged intervals after the first (start-up), mIoU the final evaluation's."""
    import statistics

    import train

    argv = ["--method", method, "--max-steps", str(args.demo_steps), "--device", str(device),
            "--out", str(work / "demo"), "--name", method]  # fmt: skip
    if args.dry_run:
        argv += ["--val-samples", "4", "--batch-size", "2", "--workers", "0", "--warmup", "1",
                 "--log-every", "1"]  # fmt: skip
    train.main(argv)
    run = work / "demo" / method
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    times = [r["s_per_step"] for r in rows if "s_per_step" in r]
    summary = json.loads((run / "metrics.json").read_text())
    shutil.rmtree(run, ignore_errors=True)  # checkpoints and pictures: not needed here
    return {
        "steps": summary["step"],
        "s_per_step": statistics.median(times[1:] or times),
        "mIoU": summary["val"]["mIoU"],
        "train_time_s": summary["train_time_s"],
    }


if __name__ == "__main__":
    main()
