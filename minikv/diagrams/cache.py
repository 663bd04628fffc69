"""Lesson 00's picture: prefill writes the KV cache, a press shrinks it, decoding appends to it.

>>> fig = draw_cache("en")
>>> len(fig.axes)
3
"""

from __future__ import annotations

from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

TOKENS = ["The", "pass", "key", "is", "6", "0"]
KEPT = (0, 2, 4, 5)  # which prompt tokens the press keeps in panel 2 (conceptual)
KV_COLOR, NEW_COLOR, GONE = "#9ecae1", "#fdae6b", "#f0f0f0"


def _cache(ax, lang, kept, x0=1.0, cell=1.2, extra=False):
    """K and V rows of the cache; evicted cells pale and hatched; ``extra`` appends one decoded token."""
    n = len(TOKENS) + (1 if extra else 0)
    for row, (name, y) in enumerate([("K", 4.0), ("V", 2.6)]):
        label(ax, x0 - 0.3, y + 0.6, name, lang, size=10, ha="right", va="center", weight="bold")
        for i in range(n):
            if i == len(TOKENS):
                box(ax, x0 + i * cell, y, cell, 1.2, fc=NEW_COLOR)
            elif i in kept:
                box(ax, x0 + i * cell, y, cell, 1.2, fc=KV_COLOR)
            else:
                box(ax, x0 + i * cell, y, cell, 1.2, fc=GONE, ec="#bbbbbb", hatch="///")


def draw_cache(lang=None):
    """Three panels: prefill fills the cache, compression removes entries, decoding appends one token per step."""
    lang = check_lang(lang)
    fig, (a1, a2, a3) = canvas((13, 4.2), ncols=3)
    cell, x0 = 1.2, 1.0
    everything = tuple(range(len(TOKENS)))

    # 1. prefill
    label(a1, 5, 9.6, pick(lang, "1. Prefill: the whole prompt, one pass", "1. 预填充：整个提示词，一次前向计算"),
          lang, size=11, ha="center", weight="bold")
    for i, t in enumerate(TOKENS):
        box(a1, x0 + i * cell, 7.2, cell, 1.2, t, lang, fc="white")
        arrow(a1, (x0 + (i + 0.5) * cell, 7.15), (x0 + (i + 0.5) * cell, 5.3), color="#555555", lw=0.8)
    _cache(a1, lang, everything)
    label(a1, 5, 1.2, pick(lang, "writes K and V of every prompt token\n(in every layer and KV head)",
                          "写入每个提示词 Token 的 K 和 V\n（每一层、每个 KV Head）"), lang, ha="center", va="center")

    # 2. compression
    label(a2, 5, 9.6, pick(lang, "2. Compression (lessons 01–02)", "2. 压缩（第 01–02 课）"), lang, size=11,
          ha="center", weight="bold")
    label(a2, 5, 7.6, pick(lang, "a press scores the entries\nand evicts the least important",
                          "press 给条目打分，\n淘汰最不重要的"), lang, ha="center", va="center")
    _cache(a2, lang, KEPT)
    label(a2, 5, 1.2, pick(lang, "the cache holds fewer tokens:\nfewer bytes", "缓存里的 Token 变少：\n字节数下降"),
          lang, ha="center", va="center")

    # 3. decode
    label(a3, 5, 9.6, pick(lang, "3. Decode: one new token per step", "3. 解码：每步一个新 Token"), lang, size=11,
          ha="center", weight="bold")
    new_x = x0 + len(TOKENS) * cell
    box(a3, new_x, 7.2, cell, 1.2, pick(lang, "new", "新"), lang, fc=NEW_COLOR)
    _cache(a3, lang, KEPT, extra=True)
    for i in KEPT:  # the new token's query reads every cached key
        arrow(a3, (x0 + (i + 0.5) * cell, 5.25), (new_x + 0.2, 7.2), color="#3182bd", lw=0.8, rad=-0.25)
    arrow(a3, (new_x + 0.6 * cell, 7.15), (new_x + 0.6 * cell, 5.3), color="#e6550d", lw=1.2)
    label(a3, 5, 1.2, pick(lang, "reads the whole cache (blue),\nappends its own K and V (orange)",
                          "读取整个缓存（蓝色），\n追加自己的 K 和 V（橙色）"), lang, ha="center", va="center")
    fig.tight_layout()
    return fig
