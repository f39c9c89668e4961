"""bench_tables.py: paired inits, the paired verdict, the markdown, resume and --jobs."""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_tables  # noqa: E402

# lr 0: a run's last.pt holds the weights it started from (AdamW with lr 0 moves nothing).
FAST = ["--batch-size", "2", "--warmup", "1", "--lr", "0", "--encoder-lr-mult", "0"]
ARGV = ["--method", "rela", "--table", "Table 2", "--rows", "#3", "--steps", "2",
        "--val-samples", "4", "--metric", "gIoU"]  # fmt: skip


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Row #3 of ReLA's Table 2 and #4, its baseline and full model (always run; #2 is built for
    the paired init only), two seeds, two steps each: (out folder, markdown)."""
    out = tmp_path_factory.mktemp("tables")
    md = bench_tables.main([*ARGV, "--seeds", "2", "--out", str(out), "--extra", *FAST])
    return out, md


def weights(out: Path, row: str, seed: int, name: str) -> dict:
    path = out / "runs" / f"rela-Table_2-{row}-s{seed}" / name
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_rows_of_a_seed_start_from_the_same_weights(table):
    out, _ = table
    for s in (0, 1):
        a, b = weights(out, "4", s, "init.pt"), weights(out, "3", s, "init.pt")
        own = json.loads((out / "runs" / f"rela-Table_2-3-s{s}" / "init.json").read_text())
        # w/o minimap's plain queries are random, the full model's a sine grid: #3 keeps its own.
        assert own["own_init"] == ["query_pos.weight"] and own["full_row"] == "#4 ReLA"
        shared = [k for k in a if k in b and a[k].shape == b[k].shape]
        assert len(shared) > 0.9 * len(a)
        for k in shared:
            assert torch.equal(a[k], b[k]) != (k in own["own_init"]), k
        # Each run started from its init.pt (lr 0: it ends where it started).
        for row in ("3", "4"):
            init, last = weights(out, row, s, "init.pt"), weights(out, row, s, "last.pt")
            assert all(torch.equal(init[k], last[k]) for k in init)
            config = json.loads((out / "runs" / f"rela-Table_2-{row}-s{s}/config.json").read_text())
            assert config["args"]["init"].endswith(f"rela-Table_2-{row}-s{s}/init.pt")
    # Another seed draws other random weights; the pretrained encoders are the same.
    s0, s1 = weights(out, "3", 0, "init.pt"), weights(out, "3", 1, "init.pt")
    bert = BertModel.from_pretrained(ROOT / "pretrained" / "tiny-bert").state_dict()
    mine = {k.removeprefix("text_encoder."): v for k, v in s0.items() if k.startswith("text_")}
    assert len(set(bert) & set(mine)) > 0.9 * len(bert)
    assert all(torch.equal(bert[k], mine[k]) for k in set(bert) & set(mine))
    encoders = [k for k in s0 if k.startswith(("text_encoder.", "vision.backbone.swin."))]
    assert encoders and all(torch.equal(s0[k], s1[k]) for k in encoders)
    assert sum(not torch.equal(s0[k], s1[k]) for k in s0) > 10


def test_markdown_kinds_and_resume(table, capsys):
    out, md = table
    lines = [line for line in md.splitlines() if line.startswith("| #")]
    assert [line.split(" | ")[0] for line in lines[:2]] == ["| #3 w/o minimap", "| #4 ReLA"]
    assert "--ablate no_minimap" in lines[0] and "| -1.54 |" in lines[0]  # paper: 62.06 - 63.60
    assert any(w in lines[0] for w in ("inside the spread", "as the paper", "against the paper"))
    assert "(full model)" in lines[1] and "| baseline |" in lines[1]
    assert "paired Δ (ours)" in md and "± " in lines[0]
    # mIoU by kind: the kinds of gshapes' first 4 val expressions, overall = train.py's mIoU.
    kinds = md[md.index("| row | overall mIoU |") :].splitlines()
    assert kinds[2].startswith("| #3 w/o minimap") and "(text-blind)" in kinds[4]
    for s in (0, 1):
        run = out / "runs" / f"rela-Table_2-3-s{s}"
        cached = json.loads((run / "kinds.json").read_text())
        every = [x for v in cached["ious"].values() for x in v]
        val = json.loads((run / "metrics.json").read_text())["val"]
        assert len(every) == 4 and abs(np.mean(every) - val["mIoU"]) < 1e-6
    assert (out / "rela_Table_2.md").read_text() == md
    assert (out / "rela_Table_2.png").stat().st_size > 0
    # Second call: every run is read back, nothing retrains or re-evaluates, the same table.
    runs = sorted((out / "runs").iterdir())
    stamps = {r: [(r / f).stat().st_mtime_ns for f in ("last.pt", "kinds.json")] for r in runs}
    capsys.readouterr()
    argv = [*ARGV, "--seeds", "2", "--out", str(out), "--extra", *FAST]
    assert bench_tables.main(argv) == md
    assert capsys.readouterr().out.count("read back") == 4
    assert stamps == {r: [(r / f).stat().st_mtime_ns for f in ("last.pt", "kinds.json")]
                      for r in runs}  # fmt: skip


def test_two_jobs_give_the_same_table(table, tmp_path):
    out, _ = table
    for row in ("3", "4"):  # the same paired inits (building them is the slow part)
        (tmp_path / "runs" / f"rela-Table_2-{row}-s0").mkdir(parents=True)
        for f in ("init.pt", "init.json"):
            name = f"runs/rela-Table_2-{row}-s0/{f}"
            shutil.copy(out / name, tmp_path / name)
    one = bench_tables.main([*ARGV, "--seeds", "1", "--out", str(out), "--extra", *FAST])
    two = bench_tables.main([*ARGV, "--seeds", "1", "--out", str(tmp_path), "--jobs", "2",
                             "--extra", *FAST])  # fmt: skip
    assert two == one
    assert (tmp_path / "runs" / "rela-Table_2-3-s0" / "train.log").is_file()  # one log per job


def test_verdict_on_paired_numbers():
    # Δ per seed: 2, 3, 4 -> mean 3 ± 1: outside the spread, with the paper's sign or not.
    assert bench_tables.verdict([52, 53, 54], [50, 50, 50], 1.2) == (3.0, 1.0, "as the paper")
    assert bench_tables.verdict([52, 53, 54], [50, 50, 50], -0.5)[2] == "against the paper"
    # Unpaired, the seeds' spread would hide it; paired, the seed-to-seed swing cancels.
    assert bench_tables.verdict([40, 60, 51], [38, 58, 50], 0.3)[2] == "as the paper"
    # Δ 1, -1, 3 -> mean 1 ± 2: inside the spread whatever the paper says.
    m, s, word = bench_tables.verdict([51, 49, 53], [50, 50, 50], 2.0)
    assert (m, s, word) == (1.0, 2.0, "inside the spread")
    assert bench_tables.verdict([52, 53, 54], [50, 50, 50], 0.0)[2].startswith("outside")
    assert bench_tables.verdict([52, 53], [50, 50], None)[2] == "no paper number"
    assert bench_tables.verdict([52, float("nan")], [50, 50], 1.0)[2] == "one seed: no spread"


def test_shares_keeps_a_rows_deliberate_init():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    assert bench_tables.shares(a, True, b, True)  # two draws of one law
    assert not bench_tables.shares(0.01 * a, True, b, True)  # a rescaled draw
    assert not bench_tables.shares(torch.zeros(64, 64), False, b, True)  # a zeroed weight
    assert bench_tables.shares(torch.ones(8), False, torch.ones(8), False)  # equal constants
    assert not bench_tables.shares(torch.full((1,), -2.0), False, torch.zeros(1), False)
    assert not bench_tables.shares(a[:8], True, b, True)  # another shape


def test_a_run_cut_short_continues_from_its_last_checkpoint(tmp_path):
    args = argparse.Namespace(budget=None, steps=10, val_samples=4, extra=[])
    folder = tmp_path / "runs" / "rela-Table_2-4-s0"
    folder.mkdir(parents=True)
    cmd = bench_tables.train_command("rela", "Table 2", "#4 ReLA", 0, folder, args)
    assert "--resume" not in cmd and cmd[cmd.index("--init") + 1] == str(folder / "init.pt")
    (folder / "last.pt").write_bytes(b"")
    cmd = bench_tables.train_command("rela", "Table 2", "#4 ReLA", 0, folder, args)
    assert cmd[cmd.index("--resume") + 1] == str(folder / "last.pt")


def test_each_row_runs_once_baseline_and_full_model_first():
    rows = {"#1 a": {"ablate": ("x",)}, "#2 full": {}, "#3 b": {"ablate": ("y",)}}
    # No row marked "baseline": the first row is the baseline.
    assert bench_tables.run_order(rows, list(rows)) == ["#1 a", "#2 full", "#3 b"]
    rows["#3 b"]["baseline"] = True
    assert bench_tables.run_order(rows, list(rows)) == ["#3 b", "#2 full", "#1 a"]
    rows = {"#1 a": {"ablate": ("x",)}, "#2 full": {"baseline": True}}  # ReLA: the full model
    assert bench_tables.run_order(rows, list(rows)) == ["#2 full", "#1 a"]
