"""Lesson 04's picture: CriticalAdaKV's two stages on a small score table.

Three KV heads x 12 tokens, n_kept = 4, so the layer keeps 12 (head, token) pairs. The kept cells
are chosen by minikv's own ``CriticalAdaKV`` (``keep_mask``), with W_o the identity, so that the
projected value norm N = ||v W_o||_1 is exactly the hand-written table ``N`` below.

* before stage 1: AdaKV's global Top-K on the attention scores gives the head budgets B_h;
* stage 1: each head protects its top max(n_safe, floor(B_h / 2)) tokens by attention score alone;
* stage 2: the rest of B_h is filled by (score + eps) * N, so a token with little attention but a
  large N can come in (marked with a star where plain AdaKV would have dropped it).

>>> out = critical_stages()
>>> out["budgets"].tolist(), out["stage1"].sum(-1).tolist()
([6, 2, 4], [3, 1, 2])
>>> [out["keep"][h].nonzero().flatten().tolist() for h in range(3)]
[[1, 3, 5, 7, 9, 11], [10, 11], [1, 3, 4, 10]]
"""

from __future__ import annotations

import torch

from ..policies.adakv import adakv_budgets, adakv_keep_mask
from ..policies.base import topk_mask_per_head
from ..policies.critical import CriticalAdaKV
from ..scorers.base import LayerInputs
from ..scorers.snapkv import SnapKV
from ._draw import box, canvas, label
from ._style import check_lang, pick

#: (n_kv, L) conceptual attention scores: head 0 spreads its attention, head 1 looks at the last
#: two tokens, head 2 at a few tokens in between
SCORES = (
    (0.30, 0.62, 0.25, 0.55, 0.12, 0.44, 0.28, 0.15, 0.20, 0.58, 0.22, 0.52),
    (0.02, 0.05, 0.03, 0.01, 0.04, 0.02, 0.06, 0.03, 0.02, 0.05, 0.45, 0.90),
    (0.10, 0.45, 0.08, 0.12, 0.50, 0.06, 0.09, 0.40, 0.11, 0.07, 0.38, 0.13),
)
#: (n_kv, L) conceptual projected value norms ||v W_o||_1: mostly about 1, two large values
N = (
    (1.0, 0.9, 1.1, 0.8, 1.0, 0.9, 0.9, 4.5, 1.0, 0.7, 1.1, 1.0),
    (1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 1.0, 1.0, 0.9),
    (0.9, 1.0, 1.1, 2.9, 1.0, 0.9, 1.2, 0.6, 1.0, 1.1, 0.8, 1.0),
)
N_KEPT, ALPHA, RATIO = 4, 0.2, 0.5


def critical_stages() -> dict[str, torch.Tensor]:
    """What CriticalAdaKV does with ``SCORES`` and ``N``: budgets (n_kv,), stage-1 / final / AdaKV keep masks (n_kv, L)."""
    s = torch.tensor(SCORES)[None]  # (1, n_kv, L)
    n = torch.tensor(N)[None]  # (1, n_kv, L)
    n_kv, L = s.shape[1:]
    # one query head per KV head, head dim 1, W_o = identity: ||v_i W_o^h||_1 = |v_i| = N[h, i]
    inputs = LayerInputs(torch.zeros(1, n_kv, L, 1), n[..., None], None, torch.eye(n_kv))
    press = CriticalAdaKV(SnapKV(), compression_ratio=0.5, alpha_safeguard=ALPHA, first_stage_ratio=RATIO)
    keep, n_safe = press.keep_mask(s, inputs, N_KEPT)  # the scorer is not called: the scores are given
    budgets = adakv_budgets(s, N_KEPT, ALPHA)  # (1, n_kv)
    stage1 = topk_mask_per_head(s, torch.clamp((budgets * RATIO).long(), min=n_safe))
    return {"budgets": budgets[0], "stage1": stage1[0], "keep": keep[0], "adakv": adakv_keep_mask(s, N_KEPT, ALPHA)[0],
            "n_safe": torch.tensor(n_safe)}


def draw_critical(lang=None):
    """Two grids of the same tokens (rows = KV heads): stage 1 by attention, stage 2 by attention x N."""
    lang = check_lang(lang)
    import matplotlib

    s, n = torch.tensor(SCORES), torch.tensor(N)  # (n_kv, L)
    n_kv, L = s.shape
    out = critical_stages()
    budgets, stage1, keep, ada = out["budgets"], out["stage1"], out["keep"], out["adakv"]
    stage2 = keep & ~stage1
    blues, oranges = matplotlib.colormaps["Blues"], matplotlib.colormaps["Oranges"]
    c1, c2 = "#08519c", "#d94801"
    fig, axes = canvas((13.5, 3.2), ncols=2, xlim=(-2.8, L + 2.9), ylim=(-1.6, n_kv + 1.9))
    product = (s + 1e-4) * n
    titles = [
        pick(lang, f"stage 1 -- cell shade: attention score (SnapKV)\nAdaKV's global Top-K gives each head its "
                   f"budget B_h ({n_kv * N_KEPT} pairs in all);\nthe head protects its top max(n_safe, floor(B_h/2)) "
                   "by attention alone",
             f"第 1 阶段——格子颜色：注意力分数（SnapKV）\nAdaKV 的全局 Top-K 给每个 Head 分配预算 B_h（共 {n_kv * N_KEPT} 对）；\n"
             "每个 Head 只按注意力保护前 max(n_safe, floor(B_h/2)) 个"),
        pick(lang, "stage 2 -- cell shade: (score + eps) x N, N = ||v W_o||_1 (number in the cell)\n"
                   "the rest of each budget B_h is filled by this product",
             "第 2 阶段——格子颜色：(score + eps) × N，N = ||v W_o||_1（格中数字）\n每个预算 B_h 的剩余部分按这个乘积补满"),
    ]
    for panel, ax in enumerate(axes):
        values = s if panel == 0 else product
        top = float(values.max())
        for h in range(n_kv):
            y = n_kv - 1 - h
            head = f"KV head {h}" if lang == "en" else f"KV Head {h}"
            label(ax, -0.3, y + 0.5, f"{head}\nB_{h} = {int(budgets[h])}", lang, ha="right", va="center", size=8)
            for i in range(L):
                cmap = blues if panel == 0 else oranges
                box(ax, i, y, 1, 1, fc=cmap(0.08 + 0.7 * float(values[h, i]) / top), ec="white", lw=0.5)
                if panel == 1:
                    label(ax, i + 0.5, y + 0.4, f"{float(n[h, i]):g}", "en", size=6.5, ha="center", va="center")
                if stage1[h, i]:
                    box(ax, i + 0.06, y + 0.06, 0.88, 0.88, fc="none", ec=c1, lw=2.2)
                elif panel == 1 and stage2[h, i]:
                    box(ax, i + 0.06, y + 0.06, 0.88, 0.88, fc="none", ec=c2, lw=2.2)
                    if not ada[h, i]:
                        label(ax, i + 0.5, y + 0.78, "★", "en", size=8, ha="center", va="center", color="black")
            kept = int(stage1[h].sum()) if panel == 0 else int(keep[h].sum())
            text = pick(lang, f"protects {kept}", f"保护 {kept}") if panel == 0 else pick(lang, f"keeps {kept}", f"保留 {kept}")
            label(ax, L + 0.3, y + 0.5, text, lang, va="center", size=8)
        label(ax, L / 2, n_kv + 0.35, titles[panel], lang, ha="center", va="bottom", size=9)
    label(axes[0], L / 2, -0.3, pick(lang, "tokens →   blue frame: protected in stage 1",
                                     "Token →   蓝框：第 1 阶段保护"), lang, ha="center", va="top", size=8)
    label(axes[1], L / 2, -0.3, pick(lang, "blue frame: stage 1, orange frame: stage 2;\n"
                                           "★ kept only because of N (AdaKV on attention alone would drop it)",
                                     "蓝框：第 1 阶段，橙框：第 2 阶段；\n★ 只因 N 大而被保留（只看注意力的 AdaKV 会淘汰它）"),
          lang, ha="center", va="top", size=8)
    fig.tight_layout()
    return fig
