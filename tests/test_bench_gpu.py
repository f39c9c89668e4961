"""bench_gpu.py --device cpu --dry-run: every measurement branch, the tables, resume, the limit."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_gpu  # noqa: E402

SECTIONS = ("## Training step", "## Largest power-of-two batch", "## One paper schedule",
            "## Input pipeline", "## The default demo")  # fmt: skip


def test_dry_run_measures_every_section_then_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring child process: one thread
    # No time limit here: a busy machine must not make the test fail (tested below).
    argv = ["--device", "cpu", "--dry-run", "--out", str(tmp_path), "--budget-s", "3600"]
    md = bench_gpu.main(argv)
    state = json.loads((tmp_path / "results.json").read_text())
    res = state["results"]
    assert list(res) == bench_gpu.plan(bench_gpu.parse_args(argv))
    assert not [k for k, v in res.items() if "error" in v], res
    assert "running" not in state["meta"] and state["meta"]["mode"] == "dry run"
    for m in bench_gpu.METHODS:
        step = res[f"step/{m}/eager"]
        assert step["step_s"] > 0 and step["train_GFLOPs_per_sample"] > 0 and step["mfu"] > 0
        assert step["image_size"] == 64 and step["batch"] == 2
        batch = res[f"batch/{m}"]  # one probe, then the simulated out-of-memory error
        assert (batch["largest"], batch["first_oom"], len(batch["probes"])) == (2, 4, 1)
        demo = res[f"demo/{m}"]
        assert demo["steps"] == 2 and demo["s_per_step"] > 0 and 0 <= demo["mIoU"] <= 1
    compiled = res[f"step/{bench_gpu.METHODS[0]}/compile"]
    assert compiled["graph_breaks"] == 0 and compiled["compile_s"] > 0
    assert compiled["mfu"] > 0  # the eager row's FLOPs
    pipe = res["pipeline"]
    assert pipe["samples_per_s"] > 0 and pipe["single_process_samples_per_s"] > 0
    assert pipe["images"] == 8 and pipe["workers"] == 1
    assert all(s in md for s in SECTIONS) and "not measured" not in md and "error" not in md
    assert "150,000 iterations x batch 48" in md and "40 epochs x 120,624 (refcoco)" in md
    assert (tmp_path / "results.md").read_text() == md

    # Rerun: everything is in the JSON, nothing is measured, the same tables come out.
    capsys.readouterr()
    assert bench_gpu.main(argv) == md
    assert " ..." not in capsys.readouterr().out  # no measurement started

    # --redo one key under a limit too short for anything: the child is stopped, that key is
    # left for the next call, the others stay.
    short = [*argv, "--redo", "demo/asda", "--budget-s", "0.5"]
    md2 = bench_gpu.main(short)
    out = capsys.readouterr().out
    assert "stopped at the --budget-s limit" in out and "1 measurement(s) left" in out
    res2 = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "demo/asda" not in res2 and {k: v for k, v in res.items() if k != "demo/asda"} == res2
    assert "| asda | not measured |" in md2


def test_full_mode_refuses_a_dry_runs_folder(tmp_path):
    (tmp_path / "results.json").write_text(
        json.dumps({"meta": {"mode": "dry run"}, "results": {"pipeline": {"images": 8}}})
    )
    with pytest.raises(SystemExit, match="holds the results of a dry run"):
        bench_gpu.main(["--device", "cpu", "--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_asked_for_without_cuda_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="CUDA is not available; use --device cpu --dry-run"):
        bench_gpu.main(["--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written
