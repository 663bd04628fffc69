"""The flat ragged layout and split-K decode attention, as one conceptual picture.

Top: the (row, KV head) segments of one layer laid end to end in one buffer, each with its free decode
reserve; ``starts`` is the exclusive cumulative sum of the capacities, a new token goes to
``starts[s] + lengths[s]``. Bottom: how the decode kernel cuts every segment into chunks of ``chunk``
tokens (split-K), one program per (segment, chunk) keeping a partial (m, l, acc), and how a second
program per segment merges them by log-sum-exp. The numbers are computed with ``minikv.gpu.layout``
(``exclusive_cumsum``, ``plan_splits``), so the picture shows what the code does.
"""

from __future__ import annotations

import torch

from ..gpu import layout
from ._style import check_lang, pick, text_kwargs

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")


def _cell(ax, x, y, colour, filled=True, w=0.92, h=0.9):
    from matplotlib.patches import Rectangle

    if filled:
        ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", alpha=0.55, lw=0.6))
    else:
        ax.add_patch(Rectangle((x, y), w, h, facecolor="white", edgecolor=colour, hatch="///", lw=0.8))


def draw_ragged(lang: str | None = None, lengths=(7, 2, 5), reserve: int = 2, block_n: int = 2, programs: int = 4):
    """Draw the flat layout (top) and split-K with its log-sum-exp merge (bottom); returns the Figure.

    lengths: tokens held by each segment (one batch row, one KV head each); reserve: free decode slots per
    segment; block_n, programs: as in ``layout.plan_splits`` (chunk = tokens per program).
    lang: "en" or "zh" (None: the notebook's folder decides).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    lang = check_lang(lang)
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1 or len(lengths) > len(COLOURS):
        raise ValueError(f"lengths must hold 1 to {len(COLOURS)} segment lengths, each >= 1; got {lengths}")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    tk = text_kwargs(lang)
    t = lambda en, zh: pick(lang, en, zh)

    lens = torch.tensor(lengths)
    capacity = lens + reserve
    starts = layout.exclusive_cumsum(capacity).tolist()
    chunk, num_splits = layout.plan_splits(int(lens.sum()), max(lengths), block_n, programs)
    total = int(capacity.sum())

    fig, (top, bot) = plt.subplots(2, 1, figsize=(11, 7.4), gridspec_kw=dict(height_ratios=[1.0, 1.75]))

    # -- top: the flat buffer ---------------------------------------------------------------------------
    for s, (n, st) in enumerate(zip(lengths, starts)):
        c = COLOURS[s]
        for i in range(n):
            _cell(top, st + i, 0, c)
        for i in range(reserve):
            _cell(top, st + n + i, 0, c, filled=False)
        top.text(st + n / 2, 1.25, t(f"segment {s}\n(row 0, KV head {s})\nlengths[{s}] = {n}",
                                     f"第 {s} 段\n（第 0 行，KV Head {s}）\nlengths[{s}] = {n}"),
                 ha="center", va="bottom", fontsize=8.5, **tk)
        top.annotate(f"starts[{s}] = {st}", xy=(st + 0.05, -0.05), xytext=(st + 0.05, -0.95), fontsize=8.5,
                     ha="left", arrowprops=dict(arrowstyle="->", lw=0.8))
    s_new = 1 if len(lengths) > 1 else 0
    slot = starts[s_new] + lengths[s_new]
    if reserve:
        top.annotate(t("next decode token of segment 1:\nstarts[1] + lengths[1] (written in place)",
                       "第 1 段的下一个解码 Token：\nstarts[1] + lengths[1]（原地写入）") if s_new else
                     t("next decode token: starts + lengths", "下一个解码 Token：starts + lengths"),
                     xy=(slot + 0.45, 0.95), xytext=(slot + 2.5, 2.7), fontsize=8.5, ha="left",
                     arrowprops=dict(arrowstyle="->", lw=0.9, color="black"), **tk)
    top.add_patch(Rectangle((total + 0.6, 0.05), 0.8, 0.8, facecolor="grey", alpha=0.55, edgecolor="black"))
    top.text(total + 1.6, 0.45, t("a kept token (its key; values\nsit in a second buffer, same rows)",
                                  "一个保留的 Token（它的 Key；Value 在\n第二个缓冲区的同一行）"),
             va="center", fontsize=8, **tk)
    top.add_patch(Rectangle((total + 0.6, -1.05), 0.8, 0.8, facecolor="white", edgecolor="grey", hatch="///"))
    top.text(total + 1.6, -0.65, t("free reserve slot", "空闲的预留位置"), va="center", fontsize=8, **tk)
    top.set_xlim(-0.5, total + 9)
    top.set_ylim(-1.3, 3.4)
    top.axis("off")
    top.set_title(t(f"1. The flat ragged layout: segments of different lengths end to end in ONE buffer (reserve {reserve})",
                    f"1. 扁平变长布局：长度不同的段首尾相接，放在同一个缓冲区里（每段预留 {reserve} 个位置）"),
                  loc="left", fontsize=11, **tk)

    # -- bottom: split-K and the merge -------------------------------------------------------------------
    row_h = 1.9
    x_merge = num_splits * chunk + 1.6
    for s, n in enumerate(lengths):
        c, y = COLOURS[s], -s * row_h
        for i in range(n):
            _cell(bot, i, y, c)
        bot.text(-0.6, y + 0.45, t(f"segment {s}", f"第 {s} 段"), ha="right", va="center", fontsize=9, **tk)
        for j in range(num_splits):
            lo, hi = j * chunk, min((j + 1) * chunk, n)
            if lo < n:  # the program has work: a partial (m, l, acc) for this chunk
                bot.add_patch(Rectangle((lo - 0.06, y - 0.08), hi - lo + 0.04, 1.06, fill=False, lw=2.0, edgecolor="black"))
                bot.text((lo + hi) / 2, y + 1.1, f"$(m, l, acc)_{{{s},{j}}}$", ha="center", va="bottom", fontsize=9)
            else:  # chunk starts past the end of this short segment: `if lo < length` is False
                bot.add_patch(Rectangle((lo, y - 0.05), chunk - 0.1, 1.0, fill=False, lw=1.0, ls="--", edgecolor="gray"))
                bot.text(lo + chunk / 2, y + 0.45, t("program exits\n(lo ≥ length)", "program 直接退出\n（lo ≥ length）"),
                         ha="center", va="center", fontsize=7.5, color="gray", **tk)
        bot.annotate("", xy=(x_merge - 0.1, y + 0.45), xytext=(num_splits * chunk + 0.1, y + 0.45),
                     arrowprops=dict(arrowstyle="->", lw=1.0, color="dimgray"))  # every partial of the segment
        bot.add_patch(FancyBboxPatch((x_merge, y + 0.05), 3.2, 0.8, boxstyle="round,pad=0.08", facecolor="white", edgecolor=c, lw=1.5))
        bot.text(x_merge + 1.6, y + 0.45, t("merge by\nlog-sum-exp", "按 log-sum-exp\n合并"), ha="center", va="center", fontsize=8.5, **tk)
        bot.annotate(t(f"out of the g query heads\nof segment {s}", f"第 {s} 段的 g 个\n查询 Head 的输出"),
                     xy=(x_merge + 3.35, y + 0.45), xytext=(x_merge + 4.2, y + 0.45), va="center", fontsize=8.5,
                     arrowprops=dict(arrowstyle="<-", lw=0.9), **tk)
    y_text = -(len(lengths) - 1) * row_h - 1.1
    bot.text(0, y_text, t(
        "inside a program, per tile of BLOCK_N tokens (s = base-2 logits):",
        "program 内部，每个 BLOCK_N 个 Token 的分块（s 为以 2 为底的 logits）："), fontsize=9, va="top", **tk)
    bot.text(0, y_text - 0.65,
             r"$m' = \max(m, \max_i s_i)$,   $l \leftarrow l\,2^{m-m'} + \sum_i 2^{s_i-m'}$,   "
             r"$acc \leftarrow acc\,2^{m-m'} + \sum_i 2^{s_i-m'} v_i$,   $m \leftarrow m'$", fontsize=10, va="top")
    bot.text(0, y_text - 1.45, t("each program writes out_j = acc / l and lse_j = m + log2 l; the merge:",
                                 "每个 program 写出 out_j = acc / l 和 lse_j = m + log2 l；合并："), fontsize=9, va="top", **tk)
    bot.text(0, y_text - 2.1, r"$lse = \log_2 \sum_j 2^{lse_j}$,   $out = \sum_j 2^{lse_j - lse}\, out_j$", fontsize=10, va="top")
    bot.set_xlim(-3.2, x_merge + 9)
    bot.set_ylim(y_text - 2.8, 2.0)
    bot.axis("off")
    bot.set_title(t(f"2. Split-K: chunk = {chunk} tokens ({chunk // block_n} tiles of BLOCK_N = {block_n}), "
                    f"grid = {len(lengths)} segments × {num_splits} chunks",
                    f"2. Split-K：每个分片（chunk）{chunk} 个 Token（{chunk // block_n} 个 BLOCK_N = {block_n} 的分块），"
                    f"grid = {len(lengths)} 段 × {num_splits} 个分片"),
                  loc="left", fontsize=11, **tk)
    fig.tight_layout()
    return fig
