"""Lesson 03's picture: one head's floor and ceiling, and the layer's budget that never changes.

4 KV heads, L = 100 context tokens, compression ratio 0.75, alpha_safeguard = 0.2, so
n_kept = 25 (the average per head), n_safe = 5 (the floor) and the ceiling of one head is
n_safe + n_kv * (n_kept - n_safe) = 85 -- every number from ``minikv.budget``.

* left: one head's budget on the axis 0 .. L: it can keep anything between its floor and its ceiling;
* right: the layer's n_kv * n_kept = 100 (head, token) pairs, split three ways -- uniform, an
  adaptive split, and the extreme one where three heads sit at their floor.

>>> budget_numbers()
{'L': 100, 'n_kv': 4, 'n_kept': 25, 'n_safe': 5, 'ceiling': 85}
"""

from __future__ import annotations

from ..budget import head_ceiling, n_kept, n_safe
from ._draw import arrow, box, canvas, label
from ._style import check_lang, pick

L, N_KV, CR, ALPHA = 100, 4, 0.75, 0.2
#: an adaptive split of the same 100 pairs (what AdaKV might give four heads)
ADAPTIVE = (40, 10, 35, 15)
COLORS = ("#4292c6", "#41ab5d", "#fd8d3c", "#9e9ac8")


def budget_numbers() -> dict[str, int]:
    """The numbers the picture is drawn from."""
    k = n_kept(L, CR)
    safe = n_safe(k, ALPHA)
    return {"L": L, "n_kv": N_KV, "n_kept": k, "n_safe": safe, "ceiling": head_ceiling(k, safe, N_KV, L)}


def splits() -> dict[str, tuple[int, ...]]:
    """Three ways to split the layer's n_kv * n_kept pairs: all sum to the same total, none below the floor."""
    b = budget_numbers()
    k, safe, top = b["n_kept"], b["n_safe"], b["ceiling"]
    return {"uniform": (k,) * N_KV, "adaptive": ADAPTIVE, "extreme": (top,) + (safe,) * (N_KV - 1)}


def draw_safeguard(lang=None):
    """Left: one head's floor / uniform share / ceiling on 0 .. L. Right: three splits of the same total."""
    lang = check_lang(lang)
    b = budget_numbers()
    k, safe, top = b["n_kept"], b["n_safe"], b["ceiling"]
    scale = 0.1  # data units per token
    fig, (left, right) = canvas((13, 3.4), ncols=2, xlim=(-1.5, 11.5), ylim=(-2.2, 6.2))

    # --- one head ------------------------------------------------------------------------------
    y0, h = 2.0, 1.0
    box(left, 0, y0, safe * scale, h, fc="#cb181d", ec="none")
    box(left, safe * scale, y0, (top - safe) * scale, h, fc="#9ecae1", ec="none")
    box(left, top * scale, y0, (L - top) * scale, h, fc="#d9d9d9", ec="none", hatch="//")
    box(left, 0, y0, L * scale, h, fc="none", ec="black", lw=1.0)
    marks = [
        (safe, pick(lang, f"floor n_safe = {safe}\n= max(1, floor(alpha * n_kept))", f"下限 n_safe = {safe}\n= max(1, floor(alpha · n_kept))"), "#cb181d", -1),
        (k, pick(lang, f"uniform n_kept = {k}", f"均匀分配 n_kept = {k}"), "black", 1),
        (top, pick(lang, f"ceiling = {top}\n= n_safe + n_kv (n_kept - n_safe)", f"上限 = {top}\n= n_safe + n_kv (n_kept − n_safe)"), "#08519c", -1),
        (L, f"L = {L}", "black", 1),
    ]
    for x, text, color, side in marks:
        left.plot([x * scale] * 2, [y0 - 0.25, y0 + h + 0.25], color=color, lw=1.6)
        yt = y0 + h + 0.45 if side > 0 else y0 - 0.45
        label(left, x * scale, yt, text, lang, size=8, ha="center", va="bottom" if side > 0 else "top", color=color)
    label(left, L * scale / 2, 5.3, pick(lang, f"one KV head under AdaKV ({N_KV} KV heads, L = {L}, cr = {CR}, alpha = {ALPHA})",
                                         f"AdaKV 下的一个 KV Head（{N_KV} 个 KV Head，L = {L}，cr = {CR}，alpha = {ALPHA}）"),
          lang, size=9.5, ha="center", va="bottom")
    label(left, L * scale / 2, 4.55, pick(lang, "red: always kept (its own top n_safe)   blue: possible   grey: out of reach",
                                          "红：一定保留（自己的前 n_safe 个）  蓝：可能的范围  灰：达不到"),
          lang, size=8, ha="center", va="bottom")

    # --- the layer's total -----------------------------------------------------------------------
    total = N_KV * k
    names = {"uniform": pick(lang, "uniform", "均匀分配"), "adaptive": pick(lang, "adaptive", "自适应"),
             "extreme": pick(lang, "extreme:\none head at its ceiling", "极端：一个 Head\n达到上限")}
    for row, (name, split) in enumerate(splits().items()):
        y = 3.4 - 1.8 * row
        x = 0.0
        for head, (count, color) in enumerate(zip(split, COLORS)):
            box(right, x * scale, y, count * scale, 1.0, fc=color, ec="white", lw=1.0)
            box(right, x * scale, y, safe * scale, 1.0, fc="none", ec="#cb181d", lw=0, hatch="xxx")
            if count >= 8:
                label(right, (x + count / 2) * scale, y + 0.5, str(count), "en", size=8, ha="center", va="center")
            x += count
        label(right, -0.2, y + 0.5, names[name], lang, size=8, ha="right", va="center")
    arrow(right, (0, -0.55), (total * scale, -0.55), style="<|-|>", lw=1.0)
    label(right, total * scale / 2, -0.75, pick(lang, f"always n_kv * n_kept = {N_KV} x {k} = {total} (head, token) pairs; "
                                                      "hatched: each head's floor",
                                                f"总数永远是 n_kv · n_kept = {N_KV} × {k} = {total} 个（Head, Token）对；斜线：每个 Head 的下限"),
          lang, size=8, ha="center", va="top")
    label(right, total * scale / 2, 5.3, pick(lang, "the layer's budget: same total, split between heads (colours)",
                                              "一层的预算：总数不变，只是在 Head（颜色）之间重新分配"),
          lang, size=9.5, ha="center", va="bottom")
    fig.tight_layout()
    return fig
