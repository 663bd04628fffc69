"""Shared by every diagram: which language to label in, and a font that has Chinese glyphs.

The Chinese labels use Noto Sans CJK SC from the `mplfonts` package (installed with minikv; the
font file ships inside the wheel, nothing is downloaded).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

LANGS = ("en", "zh")


def lesson_language(default: str = "en") -> str:
    """"zh" when the notebook runs from notebooks/zh (Jupyter and nbmake start a notebook in its
    own folder), else "en". Lets the English and Chinese notebooks share identical code cells."""
    env = os.environ.get("MINIKV_LANG")
    if env in LANGS:
        return env
    return "zh" if Path.cwd().name == "zh" else default


def check_lang(lang: str | None) -> str:
    lang = lesson_language() if lang is None else lang
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS} (or None: taken from the notebook's folder), got {lang!r}")
    return lang


@functools.lru_cache(maxsize=None)
def cjk_font_name() -> str | None:
    """Register Noto Sans CJK SC with matplotlib and return its family name (None if not installed)."""
    import importlib.util

    from matplotlib import font_manager

    spec = importlib.util.find_spec("mplfonts")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "fonts" / "NotoSansCJKsc-Regular.otf"
    if not path.exists():
        return None
    font_manager.fontManager.addfont(str(path))
    return font_manager.FontProperties(fname=str(path)).get_name()


def text_kwargs(lang: str) -> dict:
    """Keyword arguments for matplotlib text calls: the CJK font for Chinese labels."""
    if lang != "zh":
        return {}
    name = cjk_font_name()
    if name is None:
        raise RuntimeError("Chinese labels need the font of the `mplfonts` package: pip install mplfonts")
    return {"fontfamily": [name, "DejaVu Sans"]}


def pick(lang: str, en: str, zh: str) -> str:
    """The label in the diagram's language."""
    return zh if lang == "zh" else en
