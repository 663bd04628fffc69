"""Small drawing helpers shared by the lesson diagrams (boxes, arrows, an empty canvas)."""

from __future__ import annotations

from matplotlib.patches import FancyArrowPatch, Rectangle

from ._style import text_kwargs


def canvas(figsize, ncols: int = 1, xlim=(0, 10), ylim=(0, 10), **subplot_kw):
    """A figure of ``ncols`` blank axes (no ticks, no frame) with the given data limits."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False, **subplot_kw)
    for ax in axes[0]:
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_axis_off()
    return fig, list(axes[0])


def label(ax, x, y, text, lang, size=9, **kw):
    """Text in the diagram's language (the CJK font for Chinese, which has no bold face)."""
    style = {} if "family" in kw else text_kwargs(lang)  # an explicit family (monospace code) wins
    if lang == "zh":
        kw.pop("weight", None)
    return ax.text(x, y, text, fontsize=size, **style, **kw)


def box(ax, x, y, w, h, text=None, lang="en", fc="white", ec="black", size=9, lw=1.0, **kw):
    """A rectangle with its lower-left corner at (x, y), optionally with centred text."""
    ax.add_patch(Rectangle((x, y), w, h, facecolor=fc, edgecolor=ec, lw=lw, **kw))
    if text is not None:
        label(ax, x + w / 2, y + h / 2, text, lang, size=size, ha="center", va="center")


def arrow(ax, start, end, color="black", lw=1.2, style="-|>", rad=0.0, **kw):
    """An arrow from ``start`` to ``end`` (data coordinates); ``rad`` bends it."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", **kw))
