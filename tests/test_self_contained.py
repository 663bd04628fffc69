"""The repository stands alone: no lesson, README, docstring or result note cites a file outside it."""

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"SPEC\.md|TERMINOLOGY\.md|user's notes|the notes'|\.\./shared|/work/|笔记中|用户的笔记", re.I)


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out if not p.startswith("book/_build")]


def text_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n".join("".join(c["source"]) for c in cells)
    return path.read_text(encoding="utf-8")


FILES = [p for p in tracked("*.md", "*.py", "*.ipynb") if p.name != "test_self_contained.py"
         and p.name != "test_exercises.py"]  # those two spell the forbidden strings out to look for them


@pytest.mark.skipif(not FILES, reason="not a git checkout")
def test_nothing_cites_files_outside_the_repository():
    bad = []
    for p in FILES:
        for i, line in enumerate(text_of(p).splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not bad, "cites something outside the repository:\n" + "\n".join(bad)
