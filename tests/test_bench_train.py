"""bench_train.py: the default-run table from hand-made runs (no training), and its clean clone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_train  # noqa: E402


def fake_run(folder: Path, final: float, evals: list[float], commit: str, dataset: str) -> None:
    """What train.py and bench_train leave in a finished run's folder."""
    folder.mkdir(parents=True)
    val = {"mIoU": final, "oIoU": final - 0.1, "Prec@0.5": 0.4, "text_swap_IoU": 0.25,
           "diag/gate": 0.5}  # fmt: skip
    if dataset == "gshapes":
        val["N-acc"] = 0.6
    metrics = {"val": val, "best_mIoU": max(evals), "step": 5000, "train_time_s": 1200.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    log = [{"step": 20, "loss": 1.0}] + [{"step": 500 * (i + 1), "val": {"mIoU": e}}
                                         for i, e in enumerate(evals)]  # fmt: skip
    (folder / "log.jsonl").write_text("\n".join(json.dumps(x) for x in log) + "\n")
    (folder / "config.json").write_text(json.dumps({"args": {"dataset": dataset}}))
    (folder / "bench.json").write_text(json.dumps({"commit": commit, "dirty": False}))


def test_summary_of_three_seeds_and_the_table(tmp_path, capsys):
    runs = tmp_path / "runs"
    evals = {0: [0.30, 0.52, 0.48, 0.50], 1: [0.31, 0.50, 0.57, 0.55], 2: [0.2, 0.61, 0.59, 0.60]}
    for s, e in evals.items():
        fake_run(runs / f"rela-s{s}", e[-1], e, "c0ffee", "gshapes")
        fake_run(runs / f"magnet-s{s}", 0.6, [0.5, 0.6], "c0ffee" if s else "beef", "shapes")

    one = bench_train.summarize([bench_train.read_run(runs / f"rela-s{s}", 3) for s in range(3)])
    assert one["mIoU"] == pytest.approx((0.55, 0.05))  # mean, std (ddof 1) of 0.50 0.55 0.60
    assert one["last_mIoU_range"] == (0.48, 0.61)  # over every seed's last 3 evaluations
    assert one["best_mIoU"] == pytest.approx((0.5667, 0.0451), abs=1e-4)  # of 0.52 0.57 0.61
    assert one["steps"] == [5000] and one["minutes"] == 20.0 and one["commits"] == ["c0ffee"]
    assert one["text_swap_IoU"] == (0.25, 0.0) and one["diagnostics"] == {"gate": 0.5}

    capsys.readouterr()
    md = bench_train.main(["--methods", "rela", "magnet", "--out", str(tmp_path),
                           "--val-samples", "4"])  # fmt: skip
    assert capsys.readouterr().out.count("read back") == 6  # nothing trains
    lines = md.splitlines()
    assert lines[0].startswith("| method | data | seeds | steps | mIoU / gIoU | oIoU / cIoU |")
    assert "mIoU, last 3 evaluations (min-max)" in lines[0]
    rela = next(x for x in lines if x.startswith("| rela |")).split(" | ")
    assert rela[1:4] == ["gshapes", "3", "5000"]
    assert rela[4] == "55.0 ± 5.0" and rela[5] == "45.0 ± 5.0" and rela[7] == "60.0 ± 0.0"
    assert rela[8:12] == ["0.25 ± 0.00", "48.0-61.0", "56.7 ± 4.5", "20.0 |"]
    magnet = next(x for x in lines if x.startswith("| magnet |")).split(" | ")
    assert magnet[7] == "-"  # no N-acc on shapes
    blind = [x for x in lines if "(text-blind)" in x]
    assert len(blind) == 6  # three rules on each dataset
    assert "Commit of the runs: beef, c0ffee (runs from several commits)" in md
    assert (tmp_path / "default_runs.md").read_text() == md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["head"]["commit"] == bench_train.git(ROOT, "rev-parse", "HEAD")


def test_clean_clone_is_head_and_reused(tmp_path):
    clone = bench_train.clean_clone(tmp_path / "clone")
    assert bench_train.commit_of(clone) == {
        "commit": bench_train.git(ROOT, "rev-parse", "HEAD"),
        "dirty": False,
    }
    assert bench_train.clean_clone(clone) == clone  # made once, then reused
    (clone / "train.py").write_text("# changed\n")
    with pytest.raises(SystemExit, match="not a clean clone"):
        bench_train.clean_clone(clone)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", "train.py"], check=True)
