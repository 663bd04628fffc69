"""The English and Chinese notebooks stay in step, and every notebook is committed executed.

* each lesson exists in both notebooks/en and notebooks/zh;
* their code cells are identical (only markdown differs);
* every code cell has been run (it has an execution count), so the committed files show their outputs.
"""

import json
from pathlib import Path

import pytest

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
LANGS = ("en", "zh")


def notebooks(lang):
    return {p.name: p for p in sorted((NB_DIR / lang).glob("*.ipynb"))}


def code_cells(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


def source(cell):
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


ALL = sorted(set(notebooks("en")) | set(notebooks("zh")))


def test_there_are_notebooks():
    assert ALL, f"no notebooks found under {NB_DIR}/en or {NB_DIR}/zh"


def test_every_notebook_exists_in_both_languages():
    en, zh = set(notebooks("en")), set(notebooks("zh"))
    assert not en - zh, f"only in notebooks/en (add the Chinese version): {sorted(en - zh)}"
    assert not zh - en, f"only in notebooks/zh (add the English version): {sorted(zh - en)}"


@pytest.mark.parametrize("name", ALL)
def test_code_cells_identical(name):
    en, zh = notebooks("en").get(name), notebooks("zh").get(name)
    if en is None or zh is None:
        pytest.fail(f"{name} exists in only one language")
    a, b = [source(c) for c in code_cells(en)], [source(c) for c in code_cells(zh)]
    assert len(a) == len(b), f"{name}: {len(a)} code cells in en, {len(b)} in zh"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{name}: code cell {i} differs between en and zh:\n--- en\n{x}\n--- zh\n{y}"


@pytest.mark.parametrize("path", [NB_DIR / lang / name for lang in LANGS for name in ALL
                                  if (NB_DIR / lang / name).exists()], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_with_outputs(path):
    cells = code_cells(path)
    unrun = [i for i, c in enumerate(cells) if source(c).strip() and c.get("execution_count") is None]
    assert not unrun, f"{path.parent.name}/{path.name}: code cells {unrun} were never run; execute the notebook and commit it with outputs"
    assert any(c.get("outputs") for c in cells), f"{path.parent.name}/{path.name} has no outputs at all"
