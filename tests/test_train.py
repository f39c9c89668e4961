"""train.py end to end on the tiny preset: train, resume exactly, evaluate, predict, DDP, errors.

The end-to-end runs are subprocesses (what a user types); argument errors run in-process, where
they are cheaper to check.
"""

import importlib
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rela
import train

ROOT = Path(__file__).resolve().parents[1]
# Small everything: 2 samples a batch, 4 val expressions, no loader workers.
FAST = ["--batch-size", "2", "--val-samples", "4", "--workers", "0", "--warmup", "2"]


def run(args, cwd=ROOT, timeout=300, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def rela_run(tmp_path_factory):
    """Six steps of rela in one go; the other tests reuse its run folder."""
    out = tmp_path_factory.mktemp("runs")
    run(["train.py", "--method", "rela", "--max-steps", "6", "--val-every", "3",
         "--out", str(out), "--name", "a", *FAST])  # fmt: skip
    return out


def test_run_folder_has_every_output(rela_run):
    run_dir = rela_run / "a"
    for name in ("config.json", "log.jsonl", "metrics.json", "last.pt", "best.pt",
                 "curves.png", "samples.png"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp"))  # atomic writes leave nothing behind
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6
    for key in ("oIoU", "mIoU", "gIoU", "cIoU", "Prec@0.5", "N-acc", "T-acc"):
        assert 0.0 <= metrics["val"][key] <= 1.0
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "rela" and ckpt["step"] == 6
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val" in r] == [3, 6]
    # Every evaluation also asks whether the prediction depends on the expression.
    assert 0.0 <= metrics["val"]["text_swap_IoU"] <= 1.0 and "swap_mIoU" in metrics["val"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["recipe"]["name"] == "demo" and config["recipe"]["total_steps"] == 6
    # The demo fine-tunes the pretrained tiny encoders at the paper's own lr factor.
    assert config["recipe"]["encoder_lr_factor"] == rela.RECIPE["encoder_lr_factor"]


def test_resume_continues_exactly(rela_run, tmp_path):
    # 3 steps, stop (--run-steps), resume for the remaining 3: the same weights as 6 in one go.
    common = ["train.py", "--method", "rela", "--max-steps", "6", "--val-every", "3",
              "--out", str(tmp_path), "--name", "b", *FAST]  # fmt: skip
    run([*common, "--run-steps", "3"])
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["step"] == 3
    run([*common, "--resume", str(tmp_path / "b" / "last.pt")])
    a, b = weights(rela_run / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_eval_only_and_predict(rela_run, tmp_path):
    ckpt = str(rela_run / "a" / "best.pt")
    proc = run(["train.py", "--method", "rela", "--eval-only", "--resume", ckpt,
                "--out", str(tmp_path), *FAST])  # fmt: skip
    metrics = json.loads((tmp_path / "rela" / "eval_val.json").read_text())["val"]
    assert metrics["n"] == 4 and "mIoU" in proc.stdout
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(image)
    proc = run(["train.py", "--method", "rela", "--resume", ckpt, "--predict", str(image),
                "--text", "the red circle", "--out", str(tmp_path)])  # fmt: skip
    out = tmp_path / "rela" / "scene_pred.png"
    assert out.is_file() and str(out) in proc.stdout
    assert Image.open(out).size[0] > 0
    # Without --out the overlay goes beside the checkpoint, in its own run folder.
    run(["train.py", "--method", "rela", "--resume", ckpt, "--predict", str(image),
         "--text", "the red circle"])  # fmt: skip
    beside = rela_run / "a" / "scene_pred.png"
    assert beside.is_file()
    beside.unlink()


def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "train.py", "--method", "rela", "--max-steps", "3",
         "--val-every", "3", "--out", str(tmp_path), "--device", "cpu", *FAST])  # fmt: skip
    metrics = json.loads((tmp_path / "rela" / "metrics.json").read_text())
    sums = metrics["weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert metrics["step"] == 3


@pytest.mark.parametrize("method", ["magnet", "asda", "m3dec", "cm_masksd"])
def test_dry_run_every_other_method(method, tmp_path):
    train.main(["--method", method, "--max-steps", "2", "--val-every", "2",
                "--out", str(tmp_path), *FAST])  # fmt: skip
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert metrics["step"] == 2 and (tmp_path / method / "samples.png").is_file()
    recipe = json.loads((tmp_path / method / "config.json").read_text())["recipe"]
    paper_factor = importlib.import_module(method).RECIPE["encoder_lr_factor"]
    assert recipe["encoder_lr_factor"] == paper_factor  # ASDA 0.1, the others 1


# ---------------------------------------------------------------------------------------------
# Mistakes a user can make end in one line on stderr, exit code 2, no traceback.


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_unknown_ablation(capsys):
    err = one_line_error(capsys, ["--method", "rela", "--ablate", "no_such_switch"])
    assert "unknown ablation 'no_such_switch'" in err


def test_unknown_config_field(capsys):
    err = one_line_error(capsys, ["--method", "rela", "--set", "nonsense=3"])
    assert "nonsense" in err


def test_missing_data_files_named(capsys, tmp_path):
    # A tokenizer saved locally stands in for bert-base-uncased, so only the data is missing.
    import data

    data.build_tokenizer("bert", None).save_pretrained(tmp_path / "tok")
    err = one_line_error(capsys, ["--method", "rela", "--dataset", "grefcoco", "--preset", "tiny",
                                  "--data-root", str(tmp_path), "--set",
                                  f"text_name={tmp_path / 'tok'}"])  # fmt: skip
    assert "grefs(unc).json" in err


def test_checkpoint_from_another_method(capsys, rela_run):
    err = one_line_error(capsys, ["--method", "m3dec", "--eval-only", "--resume",
                                  str(rela_run / "a" / "last.pt")])  # fmt: skip
    assert "--method rela" in err


def test_not_a_checkpoint(capsys, tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a checkpoint" in one_line_error(capsys, ["--method", "rela", "--resume", str(bad)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_but_absent(capsys):
    assert "CUDA is not available" in one_line_error(
        capsys, ["--method", "rela", "--device", "cuda"]
    )


def test_empty_text_for_predict(capsys, rela_run, tmp_path):
    ckpt = str(rela_run / "a" / "last.pt")
    argv = ["--method", "rela", "--resume", ckpt, "--predict", str(tmp_path / "x.png")]
    err = one_line_error(capsys, [*argv, "--text", "  "])
    assert "non-empty --text" in err


def test_help_lists_every_methods_ablations(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for method in train.METHODS:
        assert f"{method}:" in out


def test_unreadable_image_for_predict(capsys, rela_run, tmp_path):
    ckpt = str(rela_run / "a" / "last.pt")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    good = tmp_path / "good.png"
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for bad in (garbage, truncated):
        argv = ["--method", "rela", "--resume", ckpt, "--predict", str(bad), "--text", "a circle"]
        assert "not a readable image" in one_line_error(capsys, argv)


def test_truncated_checkpoint(capsys, rela_run, tmp_path):
    cut = tmp_path / "cut.pt"
    blob = (rela_run / "a" / "last.pt").read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    err = one_line_error(capsys, ["--method", "rela", "--eval-only", "--resume", str(cut)])
    assert "not a checkpoint" in err


def test_unknown_row_lists_the_rows(capsys):
    err = one_line_error(capsys, ["--method", "rela", "--row", "Table 99 (z)"])
    assert "unknown row 'Table 99 (z)'" in err


def test_find_row_matches_the_id_token():
    tables = {
        "Table 3": {"(a) baseline": {"baseline": True}, "(b) more": {"ablate": ("x",)}},
        "Table 3a": {"#1 one": {"set": {"P": 4}}},
    }
    assert train.find_row(tables, "Table 3 (b)")[1] == "(b) more"
    assert train.find_row(tables, "Table 3a #1") == ("Table 3a", "#1 one", {"set": {"P": 4}})
    assert train.find_row(tables, "Table 3 (a) baseline")[1] == "(a) baseline"


def test_schedules_by_hand():
    poly = {"schedule": "poly", "poly_power": 0.9}
    assert train.lr_factor(0, 4, 0.0, poly) == 0.25  # warm-up: (step + 1) / warmup
    assert train.lr_factor(10, 4, 0.5, poly) == pytest.approx(0.5**0.9)
    cosine = {"schedule": "cosine"}
    assert train.lr_factor(10, 0, 0.5, cosine) == pytest.approx(0.5)
    assert train.lr_factor(10, 0, 1.0, cosine) == pytest.approx(0.0)
    # Step decay x0.1 at epochs 18 and 25 of 30 (ASDA): milestones scale with the run's length.
    step = {"schedule": "step", "milestones": (18, 25), "gamma": 0.1, "epochs": 30}
    assert train.lr_factor(5, 0, 17 / 30, step) == 1.0
    assert train.lr_factor(5, 0, 18 / 30, step) == pytest.approx(0.1)
    assert train.lr_factor(5, 0, 26 / 30, step) == pytest.approx(0.01)


class _Echo(torch.nn.Module):
    """A fake method: the mask is the image's first channel > 0, or, if `reads_text`, that channel
    only where the expression's first token is odd. No loss terms worth the name."""

    def __init__(self, reads_text: bool):
        super().__init__()
        self.reads_text = reads_text

    def forward(self, images, input_ids, attention_mask, targets=None):
        logits = images[:, :1] * 10  # (B, 1, H, W)
        if self.reads_text:
            odd = (input_ids[:, 0] % 2 == 1).float()[:, None, None, None]
            logits = torch.where(odd > 0, logits, torch.full_like(logits, -10.0))
        return {"mask_logits": logits, "loss": torch.zeros(()), "losses": {}}


def test_text_swap_iou_by_hand():
    from types import SimpleNamespace

    images = torch.full((4, 3, 4, 4), -1.0)
    images[:, 0, :2, :2] = 1.0  # every image: a 2x2 object top-left
    batch = {
        "image": images,
        "mask": torch.zeros(4, 4, 4),
        "input_ids": torch.tensor([[1], [2], [3], [4]]),  # odd, even, odd, even
        "attention_mask": torch.ones(4, 1, dtype=torch.long),
        "no_target": torch.zeros(4, dtype=torch.bool),
        "image_id": [0, 1, 2, 3],
    }
    batch["mask"][:, :2, :2] = 1.0
    cfg = SimpleNamespace(threshold=0.5)
    # A BERT-family method (Prec@X counts IoU >= X) with no mechanism to measure.
    module = SimpleNamespace(TEXT_ENCODER="bert", diagnostics=lambda outputs, batch: {})
    args = (module, [batch], cfg, torch.device("cpu"), nullcontext(), True)
    blind = train.evaluate(_Echo(reads_text=False), *args)
    assert blind["text_swap_IoU"] == 1.0 and blind["mIoU"] == 1.0 and blind["swap_mIoU"] == 1.0
    # Reading the text: sample i gets sample i+1's expression, odd <-> even, so every swapped
    # prediction flips between the object (IoU 1 with GT) and nothing (IoU 0).
    reader = train.evaluate(_Echo(reads_text=True), *args)
    assert reader["text_swap_IoU"] == 0.0
    assert reader["mIoU"] == 0.5 and reader["swap_mIoU"] == 0.5


def test_swap_partners_skip_the_same_image():
    assert train.swap_partners([7, 7, 8]) == [2, 2, 0]
    assert train.swap_partners([5, 5]) == [-1, -1]
    assert train.swap_partners([1]) == [-1]


# ---------------------------------------------------------------------------------------------
# A TABLES row's "recipe": what the paper's row ran with, applied with --recipe paper only.

ROW_WITH_RECIPE = {"Table 9": {"#1 short": {"set": {}, "recipe": {"epochs": 1, "image_size": 48}}}}


def test_row_recipe_reaches_config_json(monkeypatch, tmp_path):
    monkeypatch.setattr(rela, "TABLES", ROW_WITH_RECIPE)
    train.main(["--method", "rela", "--row", "Table 9 #1", "--recipe", "paper", "--no-pretrained",
                "--max-steps", "1", "--out", str(tmp_path), "--name", "p", *FAST])  # fmt: skip
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["recipe"]["epochs"] == 1 and "iterations" not in config["recipe"]
    assert config["recipe"]["lr"] == rela.RECIPE["lr"]  # the rest is RECIPE's
    assert config["config"]["image_size"] == 48
    assert config["row_recipe"] == {"epochs": 1, "image_size": 48}
    assert config["row_recipe_applied"] is True


def test_row_recipe_user_flags_win_and_demo_keeps_its_recipe(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(rela, "TABLES", ROW_WITH_RECIPE)
    argv = ["--method", "rela", "--row", "Table 9 #1", "--no-pretrained", "--max-steps", "1",
            "--out", str(tmp_path), *FAST]  # fmt: skip
    train.main([*argv, "--recipe", "paper", "--epochs", "2", "--set", "image_size=64",
                "--name", "user"])  # fmt: skip
    config = json.loads((tmp_path / "user" / "config.json").read_text())
    assert config["config"]["image_size"] == 64 and config["recipe"]["epochs"] == 1
    assert config["recipe"]["total_steps"] == 1  # --max-steps wins over --epochs and the row
    train.main([*argv, "--name", "demo"])  # the built-in world's default: the demo recipe
    out = capsys.readouterr().out
    assert "the paper's row ran with epochs 1, image_size 48; the demo keeps its recipe" in out
    config = json.loads((tmp_path / "demo" / "config.json").read_text())
    assert config["recipe"]["name"] == "demo" and "epochs" not in config["recipe"]
    assert config["config"]["image_size"] == rela.Config.tiny().image_size
    assert config["row_recipe_applied"] is False
    assert "(ran with epochs 1, image_size 48; --recipe paper)" in train.describe_row(
        ROW_WITH_RECIPE["Table 9"]["#1 short"]
    )


def test_row_recipe_unknown_key(monkeypatch, capsys):
    monkeypatch.setattr(rela, "TABLES", {"Table 9": {"#1 x": {"recipe": {"epoch": 1}}}})
    err = one_line_error(capsys, ["--method", "rela", "--row", "Table 9 #1"])
    assert "recipe key 'epoch'" in err


@pytest.mark.parametrize(
    "flag,value",
    [("--max-steps", "-5"), ("--max-steps", "0"), ("--epochs", "0"), ("--batch-size", "-1"),
     ("--val-every", "0"), ("--log-every", "0"), ("--warmup", "-1"), ("--time-budget", "0"),
     ("--lr", "nan")],
)  # fmt: skip
def test_bad_numbers_end_in_one_line(capsys, flag, value):
    err = one_line_error(capsys, ["--method", "rela", flag, value])
    assert err.startswith(f"error: {flag} ") and "expected" in err


def test_missing_refcoco_named_before_any_tokenizer(capsys, tmp_path, monkeypatch):
    # The paper preset's tokenizer comes from the Hub: the missing file must be named first.
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was built before the data files were checked")

    monkeypatch.setattr(train.data, "build_tokenizer", no_tokenizer)
    root = tmp_path / "nowhere"
    argv = ["--method", "magnet", "--dataset", "refcoco", "--data-root", str(root)]
    err = one_line_error(capsys, argv)
    assert f"{root / 'refcoco' / 'refs(unc).p'} not found" in err and "expected" in err
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "refs(unc).p").write_bytes(b"")
    assert "instances.json not found" in one_line_error(capsys, argv)
    (root / "refcoco" / "instances.json").write_text("{}")
    assert "train2014 not found" in one_line_error(capsys, argv)


def test_bad_init_ends_in_one_line(capsys, tmp_path):
    missing = tmp_path / "nothing.pt"
    assert f"--init weights not found: {missing}" in one_line_error(
        capsys, ["--method", "rela", "--init", str(missing)]
    )
    other = tmp_path / "other.pt"
    torch.save({"some.weight": torch.zeros(3)}, other)
    err = one_line_error(capsys, ["--method", "rela", "--init", str(other), "--max-steps", "1"])
    assert f"{other} does not fit this rela model" in err


# ---------------------------------------------------------------------------------------------
# The training step never waits for the device: no .item() / float(t) / bool(t) per step.

HOST_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_training_step_has_no_host_sync(monkeypatch, tmp_path):
    """Every read of a tensor's value is traced to the first train.py function on its stack.
    Not the loop's: the method's own forward, the data loader (host tensors), and the
    optimizer's step counter (a host tensor unless fused or capturable). A step may read values
    only in log_row, every --log-every steps."""
    callers = []
    theirs = ("rela.py", "data.py", f"torch{os.sep}utils{os.sep}", f"torch{os.sep}optim{os.sep}")

    def watch(name):
        original = getattr(torch.Tensor, name)

        def traced(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                file, function = frame.f_code.co_filename, frame.f_code.co_name
                if any(part in file for part in theirs):
                    break
                if file.endswith("train.py") and not function.startswith("<"):  # <genexpr>
                    callers.append(function)
                    break
                frame = frame.f_back
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, traced)

    for name in HOST_SYNCS:
        watch(name)
    train.main(["--method", "rela", "--max-steps", "4", "--log-every", "2", "--val-every", "4",
                "--out", str(tmp_path), "--name", "s", *FAST])  # fmt: skip
    in_loop = {"main", "to_device", "stop_or_save", "save_checkpoint", "log_row"}
    assert callers.count("log_row") > 0  # the trace sees the reads it should
    assert {c for c in callers if c in in_loop} == {"log_row"}
    rows = [json.loads(line) for line in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]


# ---------------------------------------------------------------------------------------------
# Fused Adam / AdamW on CPU too: the same update as the per-tensor loop, up to float rounding.


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_fused_optimizer_matches_unfused_on_cpu(monkeypatch, optimizer):
    cpu = torch.device("cpu")
    recipe = {"optimizer": optimizer, "lr": 1e-2, "weight_decay": 0.05,
              "encoder_lr_factor": 0.1, "frozen": ()}  # fmt: skip

    def five_steps():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        start = [p.detach().clone() for p in model.parameters()]
        opt, params = train.build_optimizer(model, recipe, cpu)
        x, y = torch.randn(32, 8), torch.randn(32, 1)
        for _ in range(5):
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert not any(torch.equal(a, b) for a, b in zip(start, params, strict=True))
        return bool(opt.defaults["fused"]), params

    fused, with_fused = five_steps()
    assert fused == train.fused_supported(cpu)
    assert fused == (tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4))
    monkeypatch.setattr(train, "fused_supported", lambda device: False)
    fused, without = five_steps()
    assert not fused
    for a, b in zip(with_fused, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", train.METHODS)
def test_old_checkpoint_config_takes_missing_fields_from_its_preset(method):
    """A Config field added after a checkpoint was saved takes its preset's value (what the
    checkpoint was trained with), not the dataclass default (the paper's)."""
    import dataclasses

    module = importlib.import_module(method)
    tiny, default = module.Config.tiny(), module.Config()
    differ = [
        f.name
        for f in dataclasses.fields(tiny)
        if getattr(tiny, f.name) != getattr(default, f.name) and f.name not in ("ablate",)
    ]
    assert differ, f"{method}: tiny() sets nothing the paper's defaults do not"
    saved = {k: v for k, v in dataclasses.asdict(tiny).items() if k not in differ}
    ckpt = {"preset": "tiny", "config": saved}
    args = train.parse_args(["--method", method])
    args.dataset = "gshapes" if method == "rela" else "shapes"
    cfg, preset, _, _ = train.build_config(args, module, ckpt, "demo", master=False)
    assert preset == "tiny"
    assert {k: getattr(cfg, k) for k in differ} == {k: getattr(tiny, k) for k in differ}
