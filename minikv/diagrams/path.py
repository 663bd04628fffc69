"""The learning path: lessons 00-06 on the left, exercises 01-09 on the right, an arrow from each
lesson to the exercises that link back to it (read from the exercise notebooks, so the picture
follows the files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

ROOT = Path(__file__).resolve().parents[2]

LESSONS = {
    "00": ("KV cache basics", "KV 缓存基础"), "01": ("SnapKV step by step", "一步步实现 SnapKV"),
    "02": ("AdaKV worked example", "AdaKV 示例"), "03": ("safeguard math", "安全保护的数学"),
    "04": ("CriticalKV / CriticalAdaKV", "CriticalKV / CriticalAdaKV"), "05": ("real-model results", "真实模型上的结果"),
    "06": ("efficient GPU path", "高效的 GPU 路径"),
}


def lesson_links(root: Path = ROOT) -> dict[str, list[str]]:
    """{exercise number: [lesson numbers its notebook links to]}, from exercises/NN_*.ipynb."""
    out = {}
    for nb in sorted((root / "exercises").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        out[nb.name[:2]] = sorted(set(re.findall(r"notebooks/(?:en|zh)/(\d\d)_", text)))
    return out


def exercise_titles(root: Path = ROOT) -> dict[str, str]:
    return {nb.name[:2]: nb.stem[3:].replace("_", " ") for nb in sorted((root / "exercises").glob("[0-9][0-9]_*.ipynb"))}


def draw_path(lang: str | None = None, root: Path = ROOT):
    """Lessons and exercises as two columns with arrows lesson -> exercise."""
    lang = check_lang(lang)
    links = lesson_links(root)
    titles = exercise_titles(root)
    n = max(len(LESSONS), len(links))
    fig, (ax,) = canvas((9, 0.62 * n + 1.2), xlim=(0, 10), ylim=(-0.5, n + 0.9))
    label(ax, 1.9, n + 0.35, pick(lang, "lessons (notebooks/en, notebooks/zh)", "课程（notebooks/en、notebooks/zh）"), lang,
          size=10, ha="center", weight="bold")
    label(ax, 8.0, n + 0.35, pick(lang, "exercises (exercises/, solutions/)", "练习（exercises/、solutions/）"), lang,
          size=10, ha="center", weight="bold")
    ly = {k: n - 1 - i * (n - 1) / max(1, len(LESSONS) - 1) for i, k in enumerate(LESSONS)}
    ey = {k: n - 1 - i * (n - 1) / max(1, len(links) - 1) for i, k in enumerate(links)}
    for k, (en, zh) in LESSONS.items():
        box(ax, 0.2, ly[k] - 0.3, 3.4, 0.6, f"{k}  {pick(lang, en, zh)}", lang, fc="#dbe9f6", size=9)
    for i, (k, y) in enumerate(ly.items()):
        if i + 1 < len(ly):
            nxt = list(ly.values())[i + 1]
            arrow(ax, (0.45, y - 0.3), (0.45, nxt + 0.3), color="#4a78a8", lw=1.0)
    for k, y in ey.items():
        box(ax, 6.4, y - 0.3, 3.2, 0.6, f"{k}  {titles[k]}", "en", fc="#fde6c8", size=9)
    for ex, lessons in links.items():
        for le in lessons:
            if le in ly:
                arrow(ax, (3.6, ly[le]), (6.4, ey[ex]), color="#888888", lw=0.9)
    return fig
