"""Lesson 02's worked example, computed: 4 KV heads, 100 tokens, compression ratio 0.5.

``n_kept = 50`` tokens per head on average, so a layer keeps 4 x 50 = 200 (head, token) pairs;
uniform SnapKV keeps 50/50/50/50, and AdaKV may split the same 200 pairs as e.g. 70/40/60/30.
Two sets of scores for the same four heads:

* ``worked_example_scores("ideal")`` -- scores *built* so that AdaKV's global top-200 (safeguard
  n_safe = floor(0.2 * 50) = 10) keeps exactly 70/40/60/30: each head puts 90 % of its attention
  on the tokens it needs (``needed_positions()``) and 10 % on the rest;
* ``worked_example_scores("snapkv")`` -- what SnapKV really measures on ``worked_example()``, a
  synthetic attention layer (keys, window queries, values, W_o) whose heads attend to the same
  tokens. AdaKV then keeps 66/43/59/32: SnapKV's pooling blurs the edges of the needed spans.

The SnapKV window is 10 tokens here (``DEMO_WINDOW``), not kvpress's 64: with L = 100 and
n_kept = 50 < 64, a 64-token window would fill every head's budget by itself.

``python -m minikv demo`` prints the kept counts of ``snapkv``, ``adakv_snapkv`` and
``critical_adakv_snapkv`` and saves a bar chart.
"""

from __future__ import annotations

import torch

from .budget import n_kept, n_safe
from .policies.adakv import adakv_budgets
from .registry import get_press
from .scorers import LayerInputs, SnapKV

#: how many earlier tokens each head needs, before the window (70/40/60/30 minus the 10-token
#: window that every head keeps)
DEMO_NEEDS = (60, 30, 50, 20)
DEMO_WINDOW = 10
SCORE_KINDS = ("ideal", "snapkv")


def _build(seed, needs, context_length, window_size, head_dim, group_size, hidden):
    """The synthetic layer and, per head, the positions of the tokens it attends to."""
    gen = torch.Generator().manual_seed(seed)
    n_kv, L, d, w = len(needs), context_length, head_dim, window_size
    prefix = L - w
    bad = [n for n in needs[:-1] if n % 10 or n > prefix] + [n for n in needs[-1:] if n > prefix]
    if bad:
        raise ValueError(f"needs: every head but the last needs a multiple of 10 tokens, and each at most the "
                         f"{prefix} tokens before the window; got {tuple(needs)}")
    keys = 0.3 * torch.randn(1, n_kv, L, d, generator=gen)  # (1, n_kv, L, d)
    queries = torch.empty(1, n_kv * group_size, w, d)  # (1, H, w, d)
    needed = []
    for h, need in enumerate(needs):
        u = torch.randn(d, generator=gen)
        u = u / u.norm()
        if h == n_kv - 1:  # the local head: the tokens right before the window
            pos = torch.arange(prefix - need, prefix)
        else:  # long-range heads: spans of 10 tokens spread over the whole prefix
            starts = torch.randperm(prefix // 10, generator=gen)[: need // 10] * 10
            pos = (starts[:, None] + torch.arange(10)).flatten()
        keys[0, h, pos] += 2.5 * u
        q = 4.0 * u + 0.3 * torch.randn(group_size, w, d, generator=gen)
        queries[0, h * group_size:(h + 1) * group_size] = q
        needed.append(pos.sort().values)
    values = torch.randn(1, n_kv, L, d, generator=gen) * torch.rand(1, n_kv, L, 1, generator=gen) * 2
    o_proj = torch.randn(hidden, n_kv * group_size * d, generator=gen) / d ** 0.5
    return LayerInputs(keys, values, queries, o_proj), needed


def worked_example(seed: int = 0, needs=DEMO_NEEDS, context_length: int = 100, window_size: int = DEMO_WINDOW,
                   head_dim: int = 32, group_size: int = 2, hidden: int = 64) -> LayerInputs:
    """Synthetic attention layer whose KV heads really differ.

    Head h attends to ``needs[h]`` earlier tokens: heads 0-2 to spans of 10 tokens spread over
    the prefix (long-range), head 3 only to the 20 tokens just before the window (local). Every
    query of the window points along one direction u_h; the keys of a head's needed tokens point
    along u_h too, the other keys are small noise. Values get random norms so that CriticalKV's
    ||v W_o|| has something to say.

    Returns LayerInputs with keys/values (1, n_kv, L, d), queries (1, n_kv * g, w, d), o_proj.
    """
    return _build(seed, needs, context_length, window_size, head_dim, group_size, hidden)[0]


def needed_positions(seed: int = 0, needs=DEMO_NEEDS, context_length: int = 100,
                     window_size: int = DEMO_WINDOW) -> list[torch.Tensor]:
    """Per head, the sorted positions of the prefix tokens it attends to in ``worked_example(seed)``.

    >>> [len(p) for p in needed_positions()]
    [60, 30, 50, 20]
    """
    return _build(seed, needs, context_length, window_size, 32, 2, 64)[1]


def worked_example_scores(kind: str = "ideal", seed: int = 0) -> torch.Tensor:
    """(1, 4, 100) importance scores of the worked example's four heads.

    kind="ideal": built by hand. Head h gives 90 % of its attention to the ``DEMO_NEEDS[h]`` tokens
      it needs (equal shares, +-5 % jitter so that no two scores tie) and 10 % to the other prefix
      tokens; the 10 window tokens score max + 1, as in SnapKV. Every needed token then outscores
      every other one, so AdaKV's global top-200 keeps exactly 70/40/60/30.
    kind="snapkv": SnapKV's scores (window 10, average pooling 5) of ``worked_example(seed)``.

    >>> adakv_budgets(worked_example_scores("ideal"), n_kept=50).tolist()
    [[70, 40, 60, 30]]
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"kind must be one of {SCORE_KINDS}, got {kind!r}")
    if kind == "snapkv":
        return SnapKV(window_size=DEMO_WINDOW).score(worked_example(seed))
    L, w = 100, DEMO_WINDOW
    gen = torch.Generator().manual_seed(seed)
    scores = torch.empty(1, len(DEMO_NEEDS), L)  # (1, n_kv, L)
    for h, pos in enumerate(needed_positions(seed)):
        needed = torch.zeros(L - w, dtype=torch.bool)
        needed[pos] = True
        share = torch.where(needed, 0.9 / needed.sum(), 0.1 / (~needed).sum())  # (L-w,): sums to 1
        scores[0, h, : L - w] = share * (1 + 0.1 * (torch.rand(L - w, generator=gen) - 0.5))
    scores[..., L - w:] = scores[..., : L - w].max() + 1  # the window, kept first
    return scores


def demo_counts(compression_ratio: float = 0.5, seed: int = 0) -> dict[str, list[int]]:
    """Per-head kept counts of the three presses on the synthetic layer ``worked_example(seed)``."""
    inputs = worked_example(seed)
    out = {}
    for name in ("snapkv", "adakv_snapkv", "critical_adakv_snapkv"):
        press = get_press(name, compression_ratio=compression_ratio, window_size=DEMO_WINDOW)
        out[name] = press.select(inputs).counts[0].tolist()
    return out


def plot_counts(counts: dict[str, list[int]], n_kept_: int, n_safe_: int, path=None, ax=None):
    """Grouped bar chart of per-head kept counts, with the uniform budget and the safeguard floor."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg") if path else None
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.8))
    n_heads = len(next(iter(counts.values())))
    width = 0.8 / len(counts)
    for i, (name, c) in enumerate(counts.items()):
        xs = [h + (i - (len(counts) - 1) / 2) * width for h in range(n_heads)]
        bars = ax.bar(xs, c, width, label=f"{name} (total {sum(c)})")
        ax.bar_label(bars, fontsize=8)
    ax.axhline(n_kept_, color="gray", ls="--", lw=1, label=f"uniform budget n_kept = {n_kept_}")
    ax.axhline(n_safe_, color="red", ls=":", lw=1, label=f"safeguard floor n_safe = {n_safe_}")
    ax.set_xticks(range(n_heads), [f"KV head {h}" for h in range(n_heads)])
    ax.set_ylabel("tokens kept")
    ax.set_title("4 KV heads, 100 tokens, compression ratio 0.5")
    ax.set_ylim(0, max(max(c) for c in counts.values()) * 1.5)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    if fig is not None and path:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return ax


def run_demo(out: str = "minikv_demo.png", compression_ratio: float = 0.5) -> dict[str, list[int]]:
    counts = demo_counts(compression_ratio)
    k = n_kept(100, compression_ratio)
    s = n_safe(k, 0.2)
    ideal = adakv_budgets(worked_example_scores("ideal"), k)[0].tolist()
    print(f"Worked example: 4 KV heads, L = 100, compression ratio {compression_ratio} "
          f"-> n_kept = {k} per head on average, n_safe = floor(0.2 * {k}) = {s}")
    print(f"SnapKV window_size = {DEMO_WINDOW}: kvpress's default 64 would leave {max(0, k - 64)} of each head's "
          f"{k} tokens for the {100 - 64} tokens before the window\n")
    print(f"hand-built scores (worked_example_scores('ideal')): adakv keeps {'/'.join(map(str, ideal))}")
    print(f"synthetic heads needing {'/'.join(str(n + DEMO_WINDOW) for n in DEMO_NEEDS)} tokens incl. the "
          f"window (worked_example()), scored by SnapKV:\n")
    print(f"{'press':<24}" + "".join(f"{'head ' + str(h):>8}" for h in range(4)) + f"{'total':>8}{'min':>6}")
    for name, c in counts.items():
        print(f"{name:<24}" + "".join(f"{x:>8}" for x in c) + f"{sum(c):>8}{min(c):>6}")
    plot_counts(counts, k, s, path=out)
    print(f"\nbar chart saved to {out}")
    return counts
