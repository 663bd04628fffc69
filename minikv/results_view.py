"""Lesson 05's helpers: read the committed evaluation results and turn them into tables and figures.

The evaluation (``python -m minikv eval``, :mod:`minikv.evaluate`) writes, per run folder under
``results/``: ``samples.jsonl.gz`` (one record per sample x press x ratio), ``summary.csv`` (mean and
95 % CI per cell) and, for paired runs, ``paired.csv`` (differences a - b on the same samples). This
module only reads them: selecting rows, grouping records, and a few small plots. Nothing here runs
a model, so every function is cheap and can be tested on tiny made-up records.

>>> rows = [dict(task="t", metric="m", ratio=0.5, a="x", b="y", n=9, ci_low=-0.2, ci_high=-0.1)]
>>> ci_signs(rows, "t", "m", "x", "y")
{0.5: -1}
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

RATIOS = (0.25, 0.5, 0.75, 0.875)


# --------------------------------------------------------------------------------------------
# finding and selecting
# --------------------------------------------------------------------------------------------
def results_dir(name: str, start=None) -> Path:
    """``results/<name>`` of the repository, found by walking up from ``start`` (default: the cwd).

    Notebooks run in notebooks/en or notebooks/zh, tests in the repository root: both find it.
    """
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be the name of one folder under results/, e.g. 'eval_heldout'; got {name!r}")
    here = Path.cwd() if start is None else Path(start)
    for p in [here, *here.parents]:
        if (p / "results" / name).is_dir():
            return p / "results" / name
    raise FileNotFoundError(f"no results/{name} folder in {here} or any folder above it")


def select(rows: list[dict], **where) -> list[dict]:
    """The rows whose fields equal every ``where`` value (floats compared with a 1e-9 tolerance).

    >>> select([dict(press="snapkv", ratio=0.5), dict(press="knorm", ratio=0.5)], press="knorm")
    [{'press': 'knorm', 'ratio': 0.5}]
    """
    def match(r):
        for k, v in where.items():
            if k not in r:
                return False
            x = r[k]
            if isinstance(v, float) and isinstance(x, (int, float)) and not isinstance(x, bool):
                if abs(x - v) > 1e-9:
                    return False
            elif x != v:
                return False
        return True

    return [r for r in rows if match(r)]


def one(rows: list[dict], **where) -> dict:
    """The single row matching ``where``; an error that says what exists when there is not exactly one."""
    hits = select(rows, **where)
    if len(hits) != 1:
        near = {k: sorted({str(r.get(k)) for r in rows}) for k in where}
        raise LookupError(f"{len(hits)} rows match {where} (exactly 1 expected); values present: {near}")
    return hits[0]


def ci_sign(row: dict) -> int:
    """-1 when a paired row's 95 % CI lies below 0, +1 when above, 0 when it includes 0."""
    if row["n"] == 0 or math.isnan(row["ci_low"]):
        raise ValueError(f"the row {row.get('task')} {row.get('metric')} {row.get('a')} - {row.get('b')} has no samples")
    return -1 if row["ci_high"] < 0 else (1 if row["ci_low"] > 0 else 0)


def ci_signs(paired: list[dict], task: str, metric: str, a: str, b: str) -> dict:
    """{ratio: ci_sign} of the paired difference a - b, over the ratios present (an error if none)."""
    rows = select(paired, task=task, metric=metric, a=a, b=b)
    if not rows:
        raise LookupError(f"no paired rows for {task} {metric} {a} - {b}; pairs present: "
                          f"{sorted({(r['a'], r['b']) for r in select(paired, task=task, metric=metric)})}")
    return {r["ratio"]: ci_sign(r) for r in sorted(rows, key=lambda r: r["ratio"])}


def paired_lines(paired: list[dict], task: str, metric: str, pairs) -> str:
    """A text table: one line per pair, per ratio the difference a - b, its 95 % CI and a's win share.

    ``*`` marks a CI that excludes 0.
    """
    rows = select(paired, task=task, metric=metric)
    ratios = sorted({r["ratio"] for r in rows})
    n = max((r["n"] for r in rows), default=0)
    better = "lower" if rows and rows[0]["lower_is_better"] else "higher"
    w = max(len(f"{a} - {b}") for a, b in pairs) + 2
    out = [f"{task}  {metric}  (a - b, 95% CI, share of samples where a is better; {better} is better; n = {n})",
           f"{'a - b':{w}}" + "".join(f"{'ratio ' + str(x):>32}" for x in ratios)]
    for a, b in pairs:
        cells = []
        for x in ratios:
            r = select(rows, a=a, b=b, ratio=x)
            if not r:
                cells.append(f"{'':>32}")
                continue
            r = r[0]
            star = "*" if ci_sign(r) else " "
            cells.append(f"{r['mean_diff']:+.4f}{star}[{r['ci_low']:+.4f},{r['ci_high']:+.4f}] {r['a_wins']:4.0%}".rjust(32))
        out.append(f"{a + ' - ' + b:{w}}" + "".join(cells))
    return "\n".join(out)


def summary_lines(rows: list[dict], task: str, metric: str, presses=None, digits: int = 2) -> str:
    """A text table of summary.csv rows: one line per press, mean [95 % CI] per ratio (no_press: ratio 0)."""
    rs = select(rows, task=task, metric=metric)
    if not rs:
        raise LookupError(f"no summary rows for task {task!r}, metric {metric!r}; tasks present: {sorted({r['task'] for r in rows})}")
    ratios = sorted({r["ratio"] for r in rs if r["press"] != "no_press"})
    presses = list(dict.fromkeys(r["press"] for r in rs)) if presses is None else list(presses)
    f = f"{{:.{digits}f}}"
    cell = lambda r: f"{f.format(r['mean'])} [{f.format(r['ci_low'])}, {f.format(r['ci_high'])}]"  # noqa: E731
    w = 13 + 3 * digits  # a cell is 11 + 3 * digits characters wide
    out = [f"{task}  {metric}  (n = {max(r['n'] for r in rs)} per cell; mean [95% CI])",
           f"{'press':24}" + "".join(f"{'ratio ' + str(x):>{w}}" for x in ratios)]
    for p in presses:
        mine = select(rs, press=p)
        if p == "no_press" and mine:
            out.append(f"{p:24}{cell(mine[0]):>{w}}  (full cache)")
            continue
        out.append(f"{p:24}" + "".join(f"{cell(select(mine, ratio=x)[0]) if select(mine, ratio=x) else '':>{w}}" for x in ratios))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# pass-key records (results/eval, results/eval_query_aware)
# --------------------------------------------------------------------------------------------
def accuracy_by_depth(records: list[dict], task: str, ratio: float, presses) -> tuple[np.ndarray, list]:
    """-> (acc (presses, depths), depths): the share of correct answers per press and needle depth."""
    rs = [r for r in records if r["task"] == task and abs(float(r["ratio"]) - ratio) < 1e-9 and "correct" in r]
    depths = sorted({r["depth"] for r in rs})
    if not depths:
        raise LookupError(f"no question records for task {task!r} at ratio {ratio}")
    acc = np.full((len(presses), len(depths)), np.nan)
    for i, p in enumerate(presses):
        for j, d in enumerate(depths):
            hits = [bool(r["correct"]) for r in rs if r["press"] == p and r["depth"] == d]
            if hits:
                acc[i, j] = np.mean(hits)
    return acc, depths


def needle_positions(tok, sample, query_aware: bool = False) -> tuple[int, list[int]]:
    """Where a pass key sits in the compressed part of the prompt: (length of that part, token positions).

    The compressed part is built as the evaluation builds it (:func:`minikv.hf.split_chat_template`);
    the positions are those of every copy of the key's digits (the needle says the key twice).
    """
    from .hf import split_chat_template

    ctx, _ = split_chat_template(tok, sample.context, sample.question, query_aware)
    ids = ctx[0].tolist()
    key = tok(sample.answer, add_special_tokens=False).input_ids
    starts = [i for i in range(len(ids) - len(key) + 1) if ids[i:i + len(key)] == key]
    if not starts:
        raise ValueError(f"the key {sample.answer!r} is not a token subsequence of the prompt (tokenizer merges it with its neighbours)")
    return len(ids), sorted({i + k for i in starts for k in range(len(key))})


def has_digit(answer: str) -> bool:
    """Did the model even try to give a number?"""
    return re.search(r"\d", answer) is not None


# --------------------------------------------------------------------------------------------
# held-out records (results/eval_heldout): per-layer arrays
# --------------------------------------------------------------------------------------------
def heldout_records(records: list[dict], task: str, press: str, ratio: float) -> list[dict]:
    """The records of one cell, sorted by sample; an error naming what exists when there are none."""
    rs = sorted((r for r in records if r["task"] == task and r["press"] == press and abs(float(r["ratio"]) - ratio) < 1e-9),
                key=lambda r: r["sample"])
    if not rs:
        have = sorted({(r["press"], r["ratio"]) for r in records if r["task"] == task})
        raise LookupError(f"no records for {task} {press} ratio {ratio}; present: {have[:12]}{' ...' if len(have) > 12 else ''}")
    return rs


def layer_values(records: list[dict], task: str, press: str, ratio: float, metric: str) -> np.ndarray:
    """(samples, layers[, heads]) array of a per-layer metric ("fut_err", "win_err", "shift", "kept", ...)."""
    rs = heldout_records(records, task, press, ratio)
    if "layers" not in rs[0] or metric not in rs[0]["layers"]:
        raise KeyError(f"records of {task} have no per-layer {metric!r}; per-layer metrics: {sorted(rs[0].get('layers', {}))}")
    return np.array([r["layers"][metric] for r in rs], dtype=float)


def safeguard_binds(kept: np.ndarray, n_safe: int) -> int:
    """How many (sample, layer, head) budgets are below the safeguard floor ``n_safe``.

    kept (samples, layers, heads): an AdaKV run's per-head budgets. Where none is below the floor of
    alpha = 0.2, that floor never changed the selection: every head already had its top n_safe tokens.
    """
    return int((np.asarray(kept) < n_safe).sum())


def kept_overlap(keep_a, keep_b) -> float:
    """Share of the (head, token) pairs kept by ``keep_a`` that ``keep_b`` keeps too.

    keep_a (..., La), keep_b (..., Lb) bool with Lb >= La: b may have extra tokens at the end (a
    prompt with the question appended); only a's La positions are compared.
    """
    a, b = np.asarray(keep_a, dtype=bool), np.asarray(keep_b, dtype=bool)
    if a.shape[:-1] != b.shape[:-1] or b.shape[-1] < a.shape[-1]:
        raise ValueError(f"keep_a (..., La) and keep_b (..., Lb) need the same leading shape and Lb >= La; got {a.shape}, {b.shape}")
    if not a.any():
        raise ValueError("keep_a keeps nothing: the overlap is undefined")
    return float((a & b[..., : a.shape[-1]]).sum() / a.sum())


def qa_template_em(records: list[dict], task: str, press: str = "no_press", ratio: float = 0.0) -> dict:
    """{template: (exact-match share, number of questions)} of one QA cell, e.g. the full cache's."""
    em: dict = {}
    for r in records:
        if r["task"] == task and r["press"] == press and abs(float(r["ratio"]) - ratio) < 1e-9:
            for q in r["questions"]:
                em.setdefault(q["template"], []).append(bool(q["em"]))
    if not em:
        raise LookupError(f"no QA records for {task} {press} ratio {ratio}")
    return {t: (float(np.mean(v)), len(v)) for t, v in sorted(em.items())}


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def plot_modes(runs: dict, task: str, metric: str = "accuracy", presses=None):
    """One panel per run (e.g. question-agnostic and query-aware): score vs compression ratio, 95 % CI bands."""
    import matplotlib.pyplot as plt

    from .registry import MAIN_PRESSES

    fig, axes = plt.subplots(1, len(runs), figsize=(5.6 * len(runs), 3.9), sharey=True, squeeze=False)
    colors = dict(zip(MAIN_PRESSES, plt.get_cmap("tab10").colors))
    for ax, (title, rows) in zip(axes[0], runs.items()):
        rs = select(rows, task=task, metric=metric)
        if not rs:
            raise LookupError(f"run {title!r} has no rows for {task} {metric}")
        names = list(dict.fromkeys(r["press"] for r in rs)) if presses is None else list(presses)
        for p in names:
            pr = sorted(select(rs, press=p), key=lambda r: r["ratio"])
            if p == "no_press":
                ax.axhline(pr[0]["mean"], color="black", ls="--", lw=1, label="no_press (full cache)")
                continue
            x = [r["ratio"] for r in pr]
            ax.plot(x, [r["mean"] for r in pr], "o-", color=colors.get(p, "gray"), lw=1.5, ms=4, label=p)
            ax.fill_between(x, [r["ci_low"] for r in pr], [r["ci_high"] for r in pr], color=colors.get(p, "gray"), alpha=0.12)
        ax.set_title(f"{title}\n{task}, n = {max(r['n'] for r in rs)} per point", fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_xticks(sorted({r["ratio"] for r in rs if r["press"] != "no_press"}))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_depth_heatmaps(runs: dict, task: str, ratio: float, presses):
    """Accuracy per press x needle depth, one heatmap per run, numbers in the squares."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs), 3.6), sharey=True, squeeze=False, layout="constrained")
    im = None
    for ax, (title, records) in zip(axes[0], runs.items()):
        acc, depths = accuracy_by_depth(records, task, ratio, presses)
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.1f}" for d in depths])
        ax.set_yticks(range(len(presses)), presses)
        ax.set_xlabel("needle depth (0 = start of context)")
        ax.set_title(f"{title}\n{task}, ratio {ratio}", fontsize=9)
        for i in range(len(presses)):
            for j in range(len(depths)):
                ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w" if acc[i, j] < 0.6 else "k")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    return fig


def plot_layer_errors(records: list[dict], task: str, ratio: float, presses=("snapkv", "adakv_snapkv")):
    """Left: mean output error per layer, held-out (solid) and in-sample (dashed), per press.
    Right: the relative error reduction of the second press over the first, held-out vs in-sample."""
    import matplotlib.pyplot as plt

    if len(presses) != 2:
        raise ValueError(f"presses must name two presses (baseline, other), got {presses!r}")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    means = {}
    for p, c in zip(presses, ("C4", "C5")):
        for m, ls, what in (("fut_err", "-", "held-out"), ("win_err", "--", "in-sample")):
            v = layer_values(records, task, p, ratio, m).mean(0)  # (layers,)
            means[p, m] = v
            ax.plot(v, ls, color=c, lw=1.4, label=f"{p}, {what}")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error of the attention output")
    ax.set_title(f"{task}, ratio {ratio}: mean over samples", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    base, other = presses
    for m, ls, what in (("fut_err", "-", "held-out"), ("win_err", "--", "in-sample")):
        red = 1 - means[other, m] / np.maximum(means[base, m], 1e-12)
        bx.plot(red, ls, color="C3", lw=1.4, label=what)
    bx.axhline(0, color="black", lw=0.8, ls=":")
    bx.set_xlabel("layer")
    bx.set_ylabel(f"1 - {other} / {base}")
    bx.set_title(f"relative error reduction of {other} over {base}", fontsize=9)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def head_share_lower(records: list[dict], task: str, a: str, b: str, ratio: float, metric: str = "fut_head_err") -> float:
    """Share of the model's KV heads (layer, head) whose mean per-head error over the samples is lower under a than b.

    The test of a per-head claim such as CriticalKV's "lower output perturbation in most heads".
    """
    x, y = layer_values(records, task, a, ratio, metric), layer_values(records, task, b, ratio, metric)  # (n, layers, heads)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"{metric} of {a} and {b} must both be (samples, layers, heads); got {x.shape} and {y.shape}")
    return float((x.mean(0) < y.mean(0)).mean())
