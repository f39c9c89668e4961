"""bench_tables.py: a two-row table with two seeds, its markdown, and its resume."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))

import bench_tables  # noqa: E402

FAST = ["--batch-size", "2", "--val-samples", "4", "--workers", "0", "--warmup", "1",
        "--val-every", "2"]  # fmt: skip


def test_two_rows_two_seeds_then_resume(tmp_path, capsys):
    argv = ["--method", "rela", "--table", "Table 2", "--rows", "#2,#3", "--seeds", "2",
            "--steps", "2", "--out", str(tmp_path), "--extra", *FAST]  # fmt: skip
    md = bench_tables.main(argv)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 4 and all((tmp_path / "runs" / r / "metrics.json").is_file() for r in runs)
    lines = [line for line in md.splitlines() if line.startswith("| #")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| #2 hard split, decoder",
        "| #3 w/o minimap",
    ]
    assert "±" in lines[0] and "--ablate" in lines[0]
    assert "baseline" in lines[0] or "baseline" in lines[1]  # one row is the comparison point
    assert (tmp_path / "rela_Table_2.md").read_text() == md
    assert (tmp_path / "rela_Table_2.png").stat().st_size > 0
    # Second call: every run is read back, nothing retrains, the same table comes out.
    stamps = {r: (tmp_path / "runs" / r / "last.pt").stat().st_mtime_ns for r in runs}
    capsys.readouterr()
    assert bench_tables.main(argv) == md
    assert capsys.readouterr().out.count("read back") == 4
    assert stamps == {r: (tmp_path / "runs" / r / "last.pt").stat().st_mtime_ns for r in runs}
