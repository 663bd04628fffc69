#!/usr/bin/env python3
"""Build the minikv book: the committed, executed notebooks as a static bilingual website.

    python book/build.py               # -> book/_build/html; open book/_build/html/index.html
    python book/build.py --out DIR     # the site in DIR instead

Nothing is executed (the notebooks are shown with their committed outputs) and nothing is
downloaded, at build time or when the site is read: Sphinx + myst-nb + sphinx-book-theme from
PyPI, math turned into MathML at build time, Chinese text in a subset of the Noto Sans CJK SC
font that the `mplfonts` package (a minikv dependency) ships.

The site:  index.html -> en/index.html
           en/  the English book: home (README overview), lessons 00-06, exercises, solutions, references
           zh/  the Chinese book, same page names; every page links to its twin in the other language
           _fonts/minikv-cjk.woff  (the CJK characters the site uses, cut from NotoSansCJKsc-Regular.otf)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

BOOK = Path(__file__).resolve().parent
ROOT = BOOK.parent
LANGS = ("en", "zh")
MARKER = ".minikv-book"          # lets a rebuild clear an old site, and nothing else
FONT_NAME = "minikv-cjk.woff"

WORDS = {
    "en": {"lessons": "Lessons", "exercises": "Exercises", "solutions": "Solutions",
           "references": "References",
           "references_intro": "The papers and software the lessons build on.",
           "solutions_note": "Solutions: the exercise notebooks with the answers filled in and every checker passing."},
    "zh": {"lessons": "课程", "exercises": "练习", "solutions": "参考答案",
           "references": "参考文献",
           "references_intro": "课程所依据的论文与软件。",
           "solutions_note": "参考答案：填好答案、所有检查都通过的练习笔记本。"},
}

_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
_NOTEBOOK = re.compile(r"notebooks/(en|zh)/([\w.-]+)\.ipynb")
# CJK ideographs and symbols, kana, full-width forms: what the subset font must cover.
_WIDE = re.compile(r"[\u2E80-\u9FFF\uF900-\uFAFF\uFE30-\uFE4F\uFF00-\uFFEF]")


def notebooks(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.ipynb"))
    if not found:
        raise SystemExit(f"no notebooks in {folder}")
    return found


def readme_overview(text: str) -> str:
    """The README up to and including its lessons section (the home page of the book)."""
    parts = re.split(r"(?m)^(?=## )", text)
    keep = [parts[0]]
    for part in parts[1:]:
        keep.append(part)
        if "lesson" in part.splitlines()[0].lower():
            break
    else:
        keep = [parts[0]]
    return "".join(keep).rstrip() + "\n"


def rewrite_links(text: str, source_dir: Path, lang: str, src: Path, doc_dir: str) -> str:
    """Point a repository Markdown file's links at the book's pages.

    source_dir: the repository folder the Markdown lives in (links are relative to it);
    src: the language's Sphinx source folder; doc_dir: the staged page's folder inside src.
    Images are copied next to the page; links to other repository files keep only their text.
    """
    up = "../" * len(Path(doc_dir).parts)

    def repl(m: re.Match) -> str:
        bang, label, url = m.groups()
        if re.match(r"[a-z][a-z0-9+.-]*:", url) or url.startswith("#"):
            return m.group(0)
        url, hash_, fragment = url.partition("#")
        anchor = hash_ + fragment
        path = os.path.normpath(os.path.relpath(source_dir / url, ROOT)).replace(os.sep, "/")
        if path.startswith(".."):   # outside the repository
            return label
        if bang:
            if (ROOT / path).is_file():
                (src / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, src / path)
                return f"![{label}]({up}{path})"
            return label
        nb = _NOTEBOOK.fullmatch(path)
        if nb and nb.group(1) == lang:
            return f"[{label}]({up}lessons/{nb.group(2)}.ipynb{anchor})"
        if nb:
            other = nb.group(1)
            return f'<a href="{up}../{other}/lessons/{nb.group(2)}.html{anchor}" hreflang="{other}">{label}</a>'
        if re.fullmatch(r"(exercises|solutions)/[\w.-]+\.ipynb", path):
            return f"[{label}]({up}{path}{anchor})"
        if path in ("exercises", "solutions"):
            return f"[{label}]({up}exercises/index.md)"
        return label

    return _LINK.sub(repl, text)


def stage_notebook(path: Path, lang: str, src: Path, doc_dir: str) -> None:
    """Copy a notebook into the book, its markdown links pointed at the book's pages."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = rewrite_links(cell.source, path.parent, lang, src, doc_dir)
    nbformat.write(nb, src / doc_dir / path.name)


def toctree(caption: str, entries: list[str]) -> str:
    body = "\n".join(entries)
    return f"```{{toctree}}\n:caption: {caption}\n:hidden:\n:maxdepth: 1\n\n{body}\n```\n"


def stage(lang: str, src: Path) -> None:
    """Lay out one language's Sphinx source folder (copies; the repository is not touched)."""
    w = WORDS[lang]
    for sub, folder in (("lessons", ROOT / "notebooks" / lang), ("exercises", ROOT / "exercises"),
                        ("solutions", ROOT / "solutions")):
        (src / sub).mkdir(parents=True, exist_ok=True)
        for nb in notebooks(folder):
            stage_notebook(nb, lang, src, sub)

    lessons = [f"lessons/{p.stem}" for p in notebooks(ROOT / "notebooks" / lang)]
    exercises = [f"exercises/{p.stem}" for p in notebooks(ROOT / "exercises")]
    solutions = [f"solutions/{p.stem}" for p in notebooks(ROOT / "solutions")]

    home = readme_overview((ROOT / "README.md").read_text(encoding="utf-8"))
    home = rewrite_links(home, ROOT, lang, src, "")
    home += "\n" + toctree(w["lessons"], lessons)
    home += toctree(w["exercises"], ["exercises/index"] + exercises)
    home += toctree(w["solutions"], solutions)
    home += toctree(w["references"], ["references"])
    (src / "index.md").write_text(home, encoding="utf-8")

    readme = ROOT / "exercises" / "README.md"
    intro = readme.read_text(encoding="utf-8") if readme.is_file() else f"# {w['exercises']}\n"
    intro = rewrite_links(intro, readme.parent, lang, src, "exercises")
    (src / "exercises" / "index.md").write_text(intro + "\n" + w["solutions_note"] + "\n", encoding="utf-8")

    (src / "references.md").write_text(
        f"# {w['references']}\n\n{w['references_intro']}\n\n```{{bibliography}}\n:all:\n```\n",
        encoding="utf-8")


def sphinx_builds(src_root: Path, work: Path, doctrees: Path, langs: tuple[str, ...]) -> None:
    """Both languages at once (one Sphinx process each: two cores, two builds), into work/<lang>/html.

    Each build gets a folder of its own because myst-nb writes images beside the output folder."""
    procs = {}
    for lang in langs:
        env = dict(os.environ, MINIKV_BOOK_LANG=lang)
        cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-c", str(BOOK),
               "-d", str(doctrees / lang), str(src_root / lang), str(work / lang / "html")]
        procs[lang] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = []
    for lang, proc in procs.items():
        log, _ = proc.communicate()
        noise = ("Building prefix dict", "Loading model from cache", "Loading model cost",
                 "Prefix dict has been built", "Dumping model to file cache")
        lines = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith(noise)]
        if lines:
            print(f"[{lang}] " + f"\n[{lang}] ".join(lines))
        if proc.returncode:
            failed.append(lang)
    if failed:
        raise SystemExit(f"sphinx-build failed for: {', '.join(failed)}")


def cjk_font_file() -> Path:
    spec = importlib.util.find_spec("mplfonts")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the book's Chinese font comes from the `mplfonts` package: pip install mplfonts")
    path = Path(list(spec.submodule_search_locations)[0]) / "fonts" / "NotoSansCJKsc-Regular.otf"
    if not path.is_file():
        raise SystemExit(f"mplfonts has no {path.name} (looked at {path})")
    return path


def subset_cjk_font(out: Path) -> tuple[int, int]:
    """Cut the CJK characters that the built pages and scripts use from Noto Sans CJK SC (WOFF)."""
    from fontTools import subset
    from fontTools.ttLib import TTFont

    chars = set()
    for f in out.rglob("*"):
        if f.suffix in (".html", ".js") and f.is_file():
            chars.update(_WIDE.findall(f.read_text(encoding="utf-8", errors="ignore")))
    opts = subset.Options()
    opts.flavor = "woff"
    opts.layout_features = ["*"]
    font = TTFont(str(cjk_font_file()), lazy=True)
    sub = subset.Subsetter(opts)
    sub.populate(text="".join(sorted(chars)))
    sub.subset(font)
    target = out / "_fonts" / FONT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    font.flavor = "woff"
    font.save(str(target))
    return len(chars), target.stat().st_size


ROOT_INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>minikv</title>
<meta http-equiv="refresh" content="0; url=en/index.html">
</head>
<body>
<p><a href="en/index.html">minikv &mdash; English</a> &middot; <a href="zh/index.html" hreflang="zh">minikv &mdash; 中文</a></p>
</body>
</html>
"""


def prepare_out(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise SystemExit(f"refusing to overwrite {out}: it is not empty and not a minikv book "
                             f"(no {MARKER} inside); pass --out with an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("built by book/build.py\n")


def build(out: Path, langs: tuple[str, ...] = LANGS) -> Path:
    t0 = time.perf_counter()
    out = out.resolve()
    prepare_out(out)
    with tempfile.TemporaryDirectory(prefix="minikv-book-") as tmp:
        tmp = Path(tmp)
        for lang in langs:
            stage(lang, tmp / "src" / lang)
        sphinx_builds(tmp / "src", tmp / "html", tmp / "doctrees", langs)
        for lang in langs:
            shutil.move(str(tmp / "html" / lang / "html"), str(out / lang))
    n_chars, n_bytes = subset_cjk_font(out)
    (out / "index.html").write_text(ROOT_INDEX, encoding="utf-8")
    (out / ".nojekyll").write_text("")   # GitHub Pages: serve _static/ and _fonts/ as they are
    print(f"book: {out / 'index.html'}  ({', '.join(langs)}; CJK font subset {n_chars} characters, "
          f"{n_bytes / 1e3:.0f} kB; {time.perf_counter() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BOOK / "_build" / "html",
                        help="output folder (default: book/_build/html)")
    parser.add_argument("--lang", choices=LANGS, action="append",
                        help="build only this language (repeatable; default: both)")
    args = parser.parse_args(argv)
    build(args.out, tuple(args.lang) if args.lang else LANGS)


if __name__ == "__main__":
    main()
