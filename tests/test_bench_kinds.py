"""bench_kinds.py: mIoU by kind of expression agrees with train.py's own evaluation."""

import json
import sys
from pathlib import Path

import data
import train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_kinds  # noqa: E402
import bench_train  # noqa: E402

N = 12


def test_kinds_add_up_to_train_py_and_the_text_blind_rule(tmp_path, capsys):
    # ReLA on gshapes: a no-target head and every kind of the generalized world.
    train.main(["--method", "rela", "--max-steps", "2", "--val-every", "2", "--batch-size", "2",
                "--val-samples", str(N), "--workers", "0", "--out", str(tmp_path)])  # fmt: skip
    val = json.loads((tmp_path / "rela" / "metrics.json").read_text())["val"]
    method, dataset, ious = bench_kinds.by_kind(str(tmp_path / "rela"), N, batch_size=5)
    assert (method, dataset) == ("rela", "gshapes")
    assert sum(len(v) for v in ious.values()) == N and set(ious) <= set(bench_kinds.KINDS)
    every = [x for v in ious.values() for x in v]
    assert abs(sum(every) / N - val["mIoU"]) < 1e-6  # the same per-sample IoU as train.py

    rule = bench_kinds.every_object("gshapes", N)
    assert {k: len(v) for k, v in rule.items()} == {k: len(v) for k, v in ious.items()}
    expected = bench_train.baselines("gshapes", N)["segment every object"]["mIoU"]
    assert abs(sum(x for v in rule.values() for x in v) / N - expected) < 1e-9
    assert rule.get("none", [0.0]) == [0.0] * len(rule.get("none", []))  # never right on none

    capsys.readouterr()
    md = bench_kinds.main([str(tmp_path / "rela"), "--samples", str(N)])["gshapes"]
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| rela (rela) | ") and rows[2].startswith("| segment every object")
    assert md in capsys.readouterr().out


def test_kind_follows_the_generator():
    shapes = [data.make_scene(i, "val", 0) for i in range(40)]
    kinds = {bench_kinds.kind(s) for s in shapes}
    assert kinds == {"attribute", "position", "ordinal", "relation"}
    for s in shapes:
        k = bench_kinds.kind(s)
        if k in ("position", "ordinal"):
            assert s.meaning[0] == "ordinal" and (s.meaning[2] == 1) == (k == "position")
