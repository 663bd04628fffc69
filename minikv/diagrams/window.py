"""Lesson 01's picture: SnapKV's observation window looks back over the prompt and scores each earlier token.

>>> fig = draw_window("en")
>>> len(fig.axes)
1
"""

from __future__ import annotations

import torch

from ..policies.base import topk_mask
from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

#: conceptual scores of the 12 prefix tokens (attention from the window, averaged and pooled)
PREFIX_SCORES = (0.9, 0.25, 0.1, 0.15, 1.6, 1.8, 1.5, 0.3, 0.2, 0.5, 0.7, 1.0)
WINDOW = 4
N_KEPT = 8
WINDOW_COLOR, KEPT_COLOR = "#fee391", "#3182bd"


def window_scores() -> torch.Tensor:
    """(L,) the prefix scores followed by the window's, max + 1 (as SnapKV appends them)."""
    prefix = torch.tensor(PREFIX_SCORES)
    return torch.cat([prefix, torch.full((WINDOW,), prefix.max().item() + 1)])


def draw_window(lang=None):
    """Tokens of one prompt; the last w form the observation window; bars = SnapKV scores; marks = Top-K."""
    lang = check_lang(lang)
    scores = window_scores()
    L, P = len(scores), len(PREFIX_SCORES)
    keep = topk_mask(scores[None], N_KEPT)[0]  # (L,)
    fig, (ax,) = canvas((12, 5.2), xlim=(-2.2, L + 0.3), ylim=(-1.6, 10.6))
    top, cell = 8.3, 1.0

    # the prompt, with its window
    for i in range(L):
        box(ax, i, top, cell, 1.0, f"t{i + 1}", lang, fc=WINDOW_COLOR if i >= P else "white", size=8)
    label(ax, P / 2, top + 1.5, pick(lang, f"prefix: the L − w = {P} earlier tokens, scored",
                                     f"前缀：前面 L − w = {P} 个 Token，要打分"), lang, ha="center")
    label(ax, P + WINDOW / 2, top + 1.7, pick(lang, f"observation window:\nthe last w = {WINDOW} tokens",
                                              f"观察窗口：\n最后 w = {WINDOW} 个 Token"), lang, ha="center", va="center")
    # the window's queries look back (arrow width ~ score)
    for i in range(P):
        lw = 0.3 + 1.6 * scores[i].item() / max(PREFIX_SCORES)
        arrow(ax, (P + 0.2, top), (i + 0.5, top), color="#e6550d", lw=lw, rad=-0.1, alpha=0.8, style="-")
    label(ax, -0.2, top + 0.5, pick(lang, "prompt", "提示词"), lang, ha="right", va="center")

    # the scores
    base, height = 2.0, 3.6
    smax = scores.max().item()
    for i in range(L):
        h = height * scores[i].item() / smax
        box(ax, i + 0.15, base, 0.7, h, fc=WINDOW_COLOR if i >= P else "#bdbdbd", lw=0.6,
            hatch="//" if i >= P else None)
    label(ax, -0.2, base + height / 2, pick(lang, "score", "分数"), lang, ha="right", va="center")
    label(ax, P / 2, base + height + 0.6,
          pick(lang, "attention from the window, averaged over its w rows, pooled along the tokens",
               "窗口对它的注意力：在 w 行上求平均，再沿 Token 方向池化"), lang, ha="center", size=8)
    label(ax, P + WINDOW / 2, base + height + 0.6, pick(lang, "max + 1", "最大值 + 1"), lang, ha="center", size=8)

    # what Top-K keeps
    for i in range(L):
        if keep[i]:
            box(ax, i + 0.15, 0.6, 0.7, 0.7, fc=KEPT_COLOR, lw=0.6)
    label(ax, -0.2, 0.95, pick(lang, "kept", "保留"), lang, ha="right", va="center")
    label(ax, L / 2, -0.9, pick(lang, f"Top-K keeps n_kept = {N_KEPT} tokens per KV head: the window first, "
                                      f"then the {N_KEPT - WINDOW} best-scored earlier tokens",
                                f"Top-K 在每个 KV Head 里保留 n_kept = {N_KEPT} 个 Token：先是窗口，"
                                f"再是分数最高的 {N_KEPT - WINDOW} 个前缀 Token"), lang, ha="center", size=9)
    fig.tight_layout()
    return fig
