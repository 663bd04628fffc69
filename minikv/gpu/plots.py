"""Figures for the GPU path: the flat layout, and the benchmark's numbers (from its JSON).

``python -m minikv.gpu.plots results/gpu/bench_h200.json results/gpu/bench_h200.png``
``python -m minikv.gpu.plots e2e results/gpu/e2e_smollm2.json results/gpu/e2e_llama8b.json results/gpu/e2e_h200.png``
"""

from __future__ import annotations

import json
import sys

METHODS = {  # name -> (label, colour)
    "full": ("full cache, SDPA", "tab:gray"),
    "masked": ("masked full cache (kvpress), SDPA", "tab:red"),
    "padded": ("ragged, padded to longest head, SDPA", "tab:orange"),
    "uniform": ("uniform cache of the same bytes, SDPA", "tab:blue"),
    "ragged": ("ragged, minikv FlatStore + Triton", "tab:green"),
}


def draw_layout(lengths, reserve: int, ax=None, title: str | None = None):
    """Draw the flat buffer: one coloured block per (row, head) segment, its free reserve hatched.

    lengths: (b, n_kv) nested list or tensor of tokens held per head.
    """
    import matplotlib.pyplot as plt

    rows = [list(map(int, r)) for r in (lengths.tolist() if hasattr(lengths, "tolist") else lengths)]
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1.9))
    colours = plt.get_cmap("tab10")
    x = 0
    for r, row in enumerate(rows):
        for h, n in enumerate(row):
            c = colours(h % 10)
            ax.barh(0, n, left=x, color=c, edgecolor="black", height=0.6)
            ax.barh(0, reserve, left=x + n, color="white", edgecolor=c, hatch="//", height=0.6)
            ax.text(x + n / 2, 0, f"r{r} h{h}\n{n}", ha="center", va="center", fontsize=8)
            ax.annotate(f"start {x}", (x, -0.32), fontsize=7, ha="left", va="top")
            x += n + reserve
    ax.set_xlim(0, x)
    ax.set_ylim(-0.6, 0.45)
    ax.set_yticks([])
    ax.set_xlabel("row of the flat buffer (one token's key per row; values have the same layout)")
    ax.set_title(title or f"flat ragged layout: segment per (row r, KV head h), reserve {reserve} (hatched)")
    return ax


def _label(ax, xlabel, ylabel, title, logy=True):
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return ax


def _rows(data, **match):
    return [r for r in data["rows"] if all(r.get(k) == v for k, v in match.items())]


def plot_times(data, model: str, b: int, ratio: float, ax=None):
    """Decode attention time vs context length, every method, one batch size and ratio."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    for m, (label, c) in METHODS.items():
        rs = sorted(_rows(data, model=model, b=b, method=m, ratio=0.0 if m == "full" else ratio), key=lambda r: r["L"])
        if rs:
            ax.plot([r["L"] for r in rs], [r["ms"] * 1e3 for r in rs], "o-", color=c, label=label)
    ax.set_xscale("log", base=2)
    return _label(ax, "context length L (tokens)", "one decode step of attention (us)", f"{model}, batch {b}, ratio {ratio}")


def plot_bandwidth(data, ax=None):
    """Achieved bandwidth (bytes it must read / time) as a fraction of the copy bandwidth, vs bytes read."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    for m in ("full", "uniform", "ragged"):
        label, c = METHODS[m]
        rs = _rows(data, method=m)
        ax.scatter([r["read_bytes"] / 1e9 for r in rs], [100 * r["frac_copy"] for r in rs], s=14, color=c,
                   label=label, alpha=0.8)
    ax.axhline(85, color="black", ls="--", lw=1)
    ax.text(0.003, 87, "85% of copy", fontsize=8)
    ax.set_xscale("log")
    return _label(ax, "K + V bytes read per decode step (GB)", "% of device copy bandwidth",
                  f"{data['meta']['gpu']}: copy = {data['meta']['copy_bw'] / 1e12:.2f} TB/s", logy=False)


def plot_speedup(data, ratio: float = 0.75, ax=None):
    """Ragged time / full-cache time at one ratio, vs full cache bytes; the 0.3 target and the ideal 1 - ratio."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    full = {(r["model"], r["L"], r["b"]): r for r in _rows(data, method="full")}
    for m, c in (("ragged", "tab:green"), ("masked", "tab:red"), ("padded", "tab:orange")):
        rs = _rows(data, method=m, ratio=ratio)
        ax.scatter([full[(r["model"], r["L"], r["b"])]["kv_bytes"] / 1e9 for r in rs],
                   [r["ms"] / full[(r["model"], r["L"], r["b"])]["ms"] for r in rs], s=14, color=c, label=METHODS[m][0])
    ax.axhline(0.3, color="black", ls="--", lw=1)
    ax.axhline(1 - ratio, color="tab:green", ls=":", lw=1)
    ax.set_xscale("log")
    return _label(ax, "full cache K + V bytes of the layer (GB)", "time / full-cache SDPA time",
                  f"ratio {ratio}: target <= 0.3 (dashed), ideal {1 - ratio} (dotted)")


def figure(data):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    plot_times(data, "llama8b", 8, 0.75, axes[0, 0])
    plot_times(data, "smollm2", 32, 0.75, axes[0, 1])
    plot_bandwidth(data, axes[1, 0])
    plot_speedup(data, 0.75, axes[1, 1])
    axes[0, 0].legend(fontsize=7)
    axes[1, 0].legend(fontsize=7)
    axes[1, 1].legend(fontsize=7)
    fig.suptitle(f"minikv decode attention, {data['meta']['gpu']}, {data['meta']['dtype']}, "
                 f"torch {data['meta']['torch']}, triton {data['meta']['triton']}")
    fig.tight_layout()
    return fig


E2E_COLOURS = {"dynamic_eager": "tab:red", "static_sdpa": "tab:gray", "static_triton": "tab:blue",
               "compressed": "tab:green", "compressed_eager": "tab:olive"}


def plot_e2e(data, ax=None):
    """One bar per row of an e2e run: ms per decode step (log scale), the step's floor as a black tick."""
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "ms_per_step" in r]
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["ms_per_step"] for r in rows], color=[E2E_COLOURS.get(r["method"], "black") for r in rows], alpha=0.85)
    ax.scatter([r["floor_ms"] for r in rows], y, marker="|", s=180, color="black", zorder=3, label="floor: bytes / copy bandwidth")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['method']}" + ("" if r["method"].startswith(("dynamic", "static")) else f" {r['press']} {r['ratio']}")
                        for r in rows], fontsize=7)
    for yi, r in zip(y, rows):
        ax.text(r["ms_per_step"] * 1.05, yi, f"{r['ms_per_step']:.2f} ms, {r['tokens_per_s']:.0f} tok/s", va="center", fontsize=6)
    ax.set_xscale("log")
    m = data["meta"]
    ax.set_xlabel("ms per decode step (median of repeats)")
    ax.set_title(f"{m['model_kind']}: batch {m['batch']} x {m['context']} tokens", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return ax


def e2e_figure(datas):
    import matplotlib.pyplot as plt

    n = max(len([r for r in d["rows"] if "ms_per_step" in r]) for d in datas)
    fig, axes = plt.subplots(1, len(datas), figsize=(7.5 * len(datas), 0.32 * n + 2), squeeze=False)
    for d, ax in zip(datas, axes[0]):
        plot_e2e(d, ax)
    fig.suptitle(f"minikv end-to-end decode, every step one CUDA graph (graph rows), {datas[0]['meta'].get('device', '')}")
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    """``plots BENCH.json OUT.png`` or ``plots e2e E2E.json [E2E.json ...] OUT.png``."""
    import matplotlib

    matplotlib.use("Agg")
    args = list(argv or sys.argv[1:])
    if args and args[0] == "e2e":
        *srcs, dst = args[1:]
        datas = []
        for src in srcs:
            with open(src) as f:
                datas.append(json.load(f))
        e2e_figure(datas).savefig(dst, dpi=110)
    else:
        src, dst = args[:2]
        with open(src) as f:
            figure(json.load(f)).savefig(dst, dpi=110)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
