"""Lesson 02's picture: per-head Top-K (uniform) against AdaKV's global Top-K over (head, token) pairs.

The kept cells are chosen by minikv's own policies (``topk_mask``, ``adakv_keep_mask``) on a small
hand-written score table: 4 KV heads x 12 tokens, n_kept = 4, so both keep 16 pairs.

>>> [int(c) for c in draw_topk_counts()["adakv"]]
[9, 1, 4, 2]
"""

from __future__ import annotations

import torch

from ..budget import n_safe
from ..policies.adakv import adakv_keep_mask
from ..policies.base import topk_mask
from ._draw import box, canvas, label
from ._style import check_lang, pick

#: (n_kv, L) conceptual scores: head 0 spreads its attention, head 3 looks at the last tokens,
#: head 1 has only low scores (the safeguard saves its best token)
SCORES = (
    (0.90, 0.81, 0.78, 0.85, 0.62, 0.75, 0.66, 0.52, 0.31, 0.22, 0.40, 0.56),
    (0.10, 0.05, 0.30, 0.21, 0.15, 0.11, 0.26, 0.06, 0.12, 0.20, 0.16, 0.35),
    (0.23, 0.71, 0.13, 0.61, 0.14, 0.24, 0.09, 0.45, 0.80, 0.17, 0.19, 0.08),
    (0.04, 0.05, 0.02, 0.03, 0.04, 0.01, 0.05, 0.03, 0.10, 0.33, 0.60, 0.95),
)
N_KEPT, ALPHA = 4, 0.2


def draw_topk_counts() -> dict[str, torch.Tensor]:
    """(n_kv,) tokens kept per head by the two policies on ``SCORES``."""
    s = torch.tensor(SCORES)[None]  # (1, n_kv, L)
    return {"uniform": topk_mask(s, N_KEPT)[0].sum(-1), "adakv": adakv_keep_mask(s, N_KEPT, ALPHA)[0].sum(-1)}


def draw_topk(lang=None):
    """Two grids of the same scores (rows = KV heads, columns = tokens); outlined cells are kept."""
    lang = check_lang(lang)
    import matplotlib

    s = torch.tensor(SCORES)[None]  # (1, n_kv, L)
    n_kv, L = s.shape[1:]
    safe = n_safe(N_KEPT, ALPHA)
    masks = {"uniform": topk_mask(s, N_KEPT)[0], "adakv": adakv_keep_mask(s, N_KEPT, ALPHA)[0]}
    guarded = topk_mask(s, safe)[0]  # each head's top n_safe: the safeguard
    cmap = matplotlib.colormaps["Greys"]
    fig, axes = canvas((13, 3.3), ncols=2, xlim=(-2.6, L + 2.6), ylim=(-1.8, n_kv + 1.6))
    titles = {
        "uniform": pick(lang, f"per-head Top-K (uniform, as in SnapKV):\neach head keeps its own {N_KEPT} best",
                        f"每个 Head 各自 Top-K（均匀分配，SnapKV）：\n每个 Head 保留自己最好的 {N_KEPT} 个"),
        "adakv": pick(lang, f"global Top-K (AdaKV): the {n_kv * N_KEPT} best of all {n_kv * L}\n(head, token) "
                            f"pairs, after each head's top {safe} is protected",
                      f"全局 Top-K（AdaKV）：在全部 {n_kv * L} 个（Head, Token）对中\n"
                      f"取最好的 {n_kv * N_KEPT} 个，先保护每个 Head 的前 {safe} 个"),
    }
    for ax, (name, keep) in zip(axes, masks.items()):
        for h in range(n_kv):
            y = n_kv - 1 - h
            label(ax, -0.3, y + 0.5, f"KV head {h}" if lang == "en" else f"KV Head {h}", lang, ha="right",
                  va="center", size=8)
            for i in range(L):
                v = s[0, h, i].item()
                box(ax, i, y, 1, 1, fc=cmap(0.1 + 0.75 * v), ec="white", lw=0.5)
                if keep[h, i]:
                    box(ax, i + 0.06, y + 0.06, 0.88, 0.88, fc="none", ec="#d7301f", lw=2.2)
                if name == "adakv" and guarded[h, i]:
                    label(ax, i + 0.5, y + 0.5, "★", "en", size=9, ha="center", va="center", color="#e6550d")
            label(ax, L + 0.3, y + 0.5, pick(lang, f"keeps {int(keep[h].sum())}", f"保留 {int(keep[h].sum())}"),
                  lang, va="center", size=8)
        label(ax, L / 2, n_kv + 0.4, titles[name], lang, ha="center", va="bottom", size=9.5)
        label(ax, L / 2, -0.3, pick(lang, "tokens →  (darker = higher score; red frame = kept)",
                                    "Token →（颜色越深分数越高；红框 = 保留）"), lang, ha="center", va="top", size=8)
    label(axes[1], L / 2, -1.3, pick(lang, f"★ safeguard: head 1's scores are all low, but its best token is kept",
                                     f"★ 安全保护：Head 1 的分数都很低，但它最好的 Token 仍被保留"),
          lang, ha="center", va="top", size=8)
    fig.tight_layout()
    return fig
