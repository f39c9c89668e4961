"""The README's commands stay true: every `python train.py` / `python data.py` line in its code
blocks runs (shortened to a couple of steps), in order, in a scratch folder.

Commands on real datasets cannot run offline: they must stop with one clear line (exit code 2).
"""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Appended to every training command: a few steps, a few val samples (later flags win in argparse).
SHORT = ["--max-steps", "2", "--val-every", "2", "--batch-size", "2", "--val-samples", "4",
         "--workers", "0"]  # fmt: skip


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split(" # ")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("python train.py", "python data.py"))]


def test_readme_has_the_three_promised_commands():
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", README, flags=re.S))
    assert "pip install -r requirements.txt" in blocks
    assert "python -m pytest" in blocks
    assert "python train.py --method rela" in readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -r requirements.txt" in ci and "python -m pytest" in ci


def test_readme_commands_run(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 8
    for command in commands:
        argv = shlex.split(command)[1:]  # drop "python"
        # Everything the README writes under runs/, out/ or docs/ goes to the scratch folder.
        argv = [re.sub(r"^(runs|out)/", f"{tmp_path}/\\1/", a) for a in argv]
        if argv[0] == "data.py":
            argv = [str(tmp_path / a) if a.endswith(".png") else a for a in argv]
        elif "--help" not in argv:
            argv += SHORT + ["--out", str(tmp_path / "runs")]
        real_data = "--dataset" in argv and argv[argv.index("--dataset") + 1] not in (
            "shapes",
            "gshapes",
        )
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        if real_data:  # no data and no Hub here: one clear line, no traceback
            assert proc.returncode == 2, command + proc.stderr[-2000:]
            assert proc.stderr.strip().startswith("error:") and "\n" not in proc.stderr.strip()
        else:
            assert proc.returncode == 0, command + "\n" + proc.stderr[-3000:]


def test_readme_table_commands_name_real_tables():
    """The Assignments' bench_tables.py commands name a method and one of its TABLES."""
    commands = re.findall(r"bench_tables\.py --method (\w+) --table \"([^\"]+)\"", README)
    assert len({m for m, _ in commands}) == 5  # one headline table per paper at least
    for method, table in commands:
        assert table in importlib.import_module(method).TABLES, (method, table)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_resolve():
    """Every relative link of the README names a file that exists, and a #part names a heading."""
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/results.md" in local and "docs/README.md" in local
    for link in local:
        path, _, part = link.partition("#")
        assert (ROOT / path).exists(), link
        if part:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), flags=re.M)
            assert part in {_anchor(h) for h in headings}, link
