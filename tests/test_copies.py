"""Blocks deliberately repeated across method files stay identical.

A method file never imports another one (one paper, one file). A small block several papers need
is written into each file that uses it, and every copy carries a line

    # Copied from <file>.<name>

right above its `def` / `class`. This test finds the original `<name>` in `<file>.py` and checks
that both blocks read the same, as transformers' `utils/check_copies.py` does for its models.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = ["magnet.py", "asda.py", "rela.py", "m3dec.py", "cm_masksd.py"]
COPY_MARK = re.compile(r"^# Copied from (\w+)\.(\w+)\s*$")


def top_level_block(lines: list[str], name: str) -> list[str] | None:
    """The lines of the top-level `def name` / `class name`, up to the next top-level statement."""
    start = next(
        (i for i, line in enumerate(lines) if re.match(rf"(def|class) {name}\b", line)), None
    )
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t)"):
        end += 1
    return [line.rstrip() for line in lines[start:end]]


def copies() -> list[tuple[str, int, str, str]]:
    found = []
    for f in METHOD_FILES:
        for i, line in enumerate((ROOT / f).read_text().splitlines()):
            m = COPY_MARK.match(line)
            if m:
                found.append((f, i + 1, m.group(1), m.group(2)))
    return found


def test_there_are_copies_to_check():
    # The encoder loader is shared by all five files; if the marks vanish, this test would be moot.
    assert len(copies()) >= 4


@pytest.mark.parametrize("copy", copies(), ids=lambda c: f"{c[0]}:{c[1]}")
def test_copy_matches_original(copy):
    path, lineno, src_file, name = copy
    lines = (ROOT / path).read_text().splitlines()
    here = top_level_block(lines[lineno:], name)
    assert here is not None, f"{path}:{lineno}: no `def/class {name}` right below the mark"
    assert lines[lineno].startswith(("def ", "class ")), f"{path}:{lineno}: mark not above {name}"
    original = top_level_block((ROOT / f"{src_file}.py").read_text().splitlines(), name)
    assert original is not None, f"{src_file}.py has no top-level {name}"
    assert here == original, f"{path}:{lineno} drifted from {src_file}.{name}; make them identical"
