"""Lesson 05's picture: a press is judged twice, on the queries that chose its tokens and on queries it never saw.

The context's last w tokens are SnapKV's observation window: their queries score every earlier
token, and the press keeps the best. Measuring the error on those same queries is *in-sample*: the
selection was fitted to them. The continuation's queries come later and were never seen by the
press: measuring on them is *held out*, what decoding will actually meet.

>>> fig = draw_heldout("en")
>>> len(fig.axes)
1
"""

from __future__ import annotations

import torch

from ..policies.base import topk_mask
from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

#: conceptual window scores of the context tokens before the window (the window itself is always kept)
PREFIX_SCORES = (1.2, 0.2, 0.4, 1.5, 0.3, 0.9, 0.1, 1.1, 0.5, 0.2, 1.3, 0.6)
WINDOW = 4
CONTINUATION = 5
N_KEPT = 8
WINDOW_COLOR, CONT_COLOR, KEPT_COLOR, EVICTED_COLOR = "#fee391", "#c7e9c0", "#3182bd", "#d9d9d9"


def kept_mask() -> torch.Tensor:
    """(context,) bool: the window (scored max + 1, as SnapKV does) and the best-scored earlier tokens."""
    prefix = torch.tensor(PREFIX_SCORES)
    scores = torch.cat([prefix, torch.full((WINDOW,), prefix.max().item() + 1)])
    return topk_mask(scores[None], N_KEPT)[0]


def draw_heldout(lang=None):
    """Context (window last), then the continuation; arcs from each group of queries; kept / evicted marks."""
    lang = check_lang(lang)
    keep = kept_mask()
    Lc = len(keep)
    P = Lc - WINDOW
    T = Lc + CONTINUATION
    fig, (ax,) = canvas((12, 5.4), xlim=(-2.6, T + 0.4), ylim=(-2.0, 10.4))
    row = 4.6

    # the tokens: context (window highlighted), then the continuation
    for i in range(T):
        fc = WINDOW_COLOR if P <= i < Lc else (CONT_COLOR if i >= Lc else "white")
        box(ax, i, row, 1.0, 1.0, f"t{i + 1}", lang, fc=fc, size=8)
    ax.plot([Lc, Lc], [row - 0.6, row + 1.6], color="black", lw=1.6, ls="--")
    label(ax, P + WINDOW / 2, row + 1.25, pick(lang, f"window (w = {WINDOW})", f"窗口（w = {WINDOW}）"), lang, ha="center", size=8)
    label(ax, Lc - 0.1, row + 1.8, pick(lang, "the press runs here", "press 在这里压缩"), lang, ha="right", size=8)
    label(ax, -0.2, row + 0.5, pick(lang, "tokens", "Token"), lang, ha="right", va="center")

    # in-sample: the window's queries scored the earlier tokens (arcs above)
    for i in range(P):
        arrow(ax, (P + 0.5, row + 1.0), (i + 0.5, row + 1.0), color="#e6550d", lw=0.5 + 1.4 * PREFIX_SCORES[i] / max(PREFIX_SCORES),
              rad=0.35, style="-", alpha=0.75)
    label(ax, P / 2, row + 4.9, pick(lang, "in-sample: the window's queries chose the tokens,\n"
                                           "and the error is measured on those same queries",
                                     "样本内：窗口的查询挑选了 Token，\n误差也在这些查询上测量"),
          lang, ha="center", va="center", size=9, color="#a63603")

    # held out: the continuation's queries read the kept cache (arcs below)
    for j in range(Lc, T):
        for i in keep.nonzero().flatten().tolist():  # they read only what was kept
            arrow(ax, (j + 0.5, row), (i + 0.5, row), color="#238b45", lw=0.5, rad=-0.2, style="-", alpha=0.35)
    label(ax, Lc + CONTINUATION / 2, row - 2.7, pick(lang, "held-out: the continuation's queries\n"
                                                            "come later; the press never saw them",
                                                      "留出：续写部分的查询来得更晚，\npress 从未见过它们"),
          lang, ha="center", va="center", size=9, color="#00441b")

    # what the press kept
    for i in range(Lc):
        box(ax, i + 0.15, 0.3, 0.7, 0.7, fc=KEPT_COLOR if keep[i] else EVICTED_COLOR, lw=0.6)
    for j in range(Lc, T):
        box(ax, j + 0.15, 0.3, 0.7, 0.7, fc=KEPT_COLOR, lw=0.6, hatch="//")
    label(ax, -0.2, 0.65, pick(lang, "cache", "缓存"), lang, ha="right", va="center")
    label(ax, T / 2, -1.3, pick(lang, f"blue = kept ({N_KEPT} of {Lc} context tokens), grey = evicted; "
                                      "the continuation is appended uncompressed (hatched)",
                                f"蓝色 = 保留（上下文 {Lc} 个 Token 中的 {N_KEPT} 个），灰色 = 淘汰；"
                                "续写部分不压缩、直接追加（斜线）"), lang, ha="center", size=9)
    fig.tight_layout()
    return fig
