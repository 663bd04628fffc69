"""Lessons 01-02's picture: a press is a policy wrapped around a scorer, and the cache keeps what it selects.

>>> fig = draw_pipeline("en")
>>> len(fig.axes)
1
"""

from __future__ import annotations

from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

STAGES = [  # (colour, English, Chinese)
    ("#f0f0f0",
     "one layer after prefill\n\nkeys, values (b, n_kv, L, d)\nwindow queries (b, H, w, d)\nW_o",
     "预填充之后的一层\n\nKey、Value (b, n_kv, L, d)\n窗口查询 (b, H, w, d)\nW_o"),
    ("#fee391",
     "scorer\nhow important is each token?\n\nSnapKV, KNorm,\nStreamingLLM, random\n→ scores (b, n_kv, L)",
     "评分器（scorer）\n每个 Token 有多重要？\n\nSnapKV、KNorm、\nStreamingLLM、random\n→ 分数 (b, n_kv, L)"),
    ("#c6dbef",
     "policy\nhow many tokens per head?\n\nUniform: Top-K per head\nAdaKV: global Top-K\nCriticalAdaKV\n→ keep mask (b, n_kv, L)",
     "策略层（policy）\n每个 Head 保留多少？\n\nUniform：每个 Head 各自 Top-K\nAdaKV：全局 Top-K\nCriticalAdaKV\n→ 保留掩码 (b, n_kv, L)"),
    ("#c7e9c0",
     "cache\nRaggedCache keeps only\nthe kept (head, token) pairs;\ndecoding appends to it",
     "缓存\nRaggedCache 只存\n被保留的（Head, Token）对；\n解码时继续追加"),
]


def draw_pipeline(lang=None):
    """Four boxes, left to right: layer inputs -> scorer -> policy -> cache, with the minikv code under them."""
    lang = check_lang(lang)
    fig, (ax,) = canvas((13, 3.6), xlim=(0, 13.4), ylim=(0, 5.6))
    w, gap = 2.8, 0.6
    for i, (color, en, zh) in enumerate(STAGES):
        x = 0.2 + i * (w + gap)
        box(ax, x, 1.6, w, 3.8, pick(lang, en, zh), lang, fc=color, size=9.5)
        if i:
            arrow(ax, (x - gap + 0.05, 3.5), (x - 0.05, 3.5), lw=1.5)
    code = 'press = AdaKV(SnapKV(), compression_ratio=0.5)   # == get_press("adakv_snapkv", 0.5)'
    label(ax, 6.7, 0.95, code, lang, size=9, ha="center", family="monospace")
    label(ax, 6.7, 0.3, pick(lang, "press.select(inputs) scores and selects one layer;  with press(model): "
                                   "compresses every layer of a real model",
                             "press.select(inputs) 给一层打分并选择；with press(model): 压缩真实模型的每一层"),
          lang, size=9, ha="center")
    fig.tight_layout()
    return fig
