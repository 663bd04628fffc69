"""The user's worked example, computed: 4 KV heads, 100 tokens, compression ratio 0.5.

``python -m minikv demo`` prints how many tokens each head keeps under ``snapkv``,
``adakv_snapkv`` and ``critical_adakv_snapkv`` and saves a bar chart.
"""

from __future__ import annotations

import torch

from .budget import n_kept, n_safe
from .registry import get_press
from .scorers import LayerInputs

#: how many earlier tokens each head really needs, before the window (the example's 70/40/60/30
#: minus the 10-token window each head always keeps)
DEMO_NEEDS = (60, 30, 50, 20)
DEMO_WINDOW = 10


def worked_example(seed: int = 0, needs=DEMO_NEEDS, context_length: int = 100, window_size: int = DEMO_WINDOW,
                   head_dim: int = 32, group_size: int = 2, hidden: int = 64) -> LayerInputs:
    """Synthetic attention layer whose KV heads really differ.

    Head h attends to ``needs[h]`` earlier tokens: head 0 looks far back over many tokens
    (long-range), head 3 only at the 20 tokens just before the window (local). Every query
    of the window points along one direction u_h; the keys of a head's "needed" tokens
    point along u_h too, the other keys are small noise. Values get random norms so that
    CriticalKV's ||v W_o|| has something to say.

    Returns LayerInputs with keys/values (1, n_kv, L, d), queries (1, n_kv * g, w, d), o_proj.
    """
    gen = torch.Generator().manual_seed(seed)
    n_kv, L, d, w = len(needs), context_length, head_dim, window_size
    prefix = L - w
    keys = 0.3 * torch.randn(1, n_kv, L, d, generator=gen)
    queries = torch.empty(1, n_kv * group_size, w, d)
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
    values = torch.randn(1, n_kv, L, d, generator=gen) * torch.rand(1, n_kv, L, 1, generator=gen) * 2
    o_proj = torch.randn(hidden, n_kv * group_size * d, generator=gen) / d ** 0.5
    return LayerInputs(keys, values, queries, o_proj)


def demo_counts(compression_ratio: float = 0.5, seed: int = 0) -> dict[str, list[int]]:
    """Per-head kept counts of the three presses on the worked example."""
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
    print(f"Worked example: 4 KV heads, L = 100, compression ratio {compression_ratio} "
          f"-> n_kept = {k} per head on average, n_safe = floor(0.2 * {k}) = {s}")
    print(f"(synthetic heads needing {'/'.join(str(n + DEMO_WINDOW) for n in DEMO_NEEDS)} tokens incl. the "
          f"{DEMO_WINDOW}-token window; SnapKV window_size = {DEMO_WINDOW})\n")
    print(f"{'press':<24}" + "".join(f"{'head ' + str(h):>8}" for h in range(4)) + f"{'total':>8}{'min':>6}")
    for name, c in counts.items():
        print(f"{name:<24}" + "".join(f"{x:>8}" for x in c) + f"{sum(c):>8}{min(c):>6}")
    plot_counts(counts, k, s, path=out)
    print(f"\nbar chart saved to {out}")
    return counts
