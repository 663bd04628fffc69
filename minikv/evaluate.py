"""Real-model results: presses x compression ratios x tasks (``python -m minikv eval``).

Tasks come from ``minikv.tasks`` (seeded, no downloads):

* ``passkey:N``   -- a 5-digit pass key in ~N tokens of haystack; score = accuracy.
* ``multifact:N`` -- six "The code of room R is C." facts, the question asks for one; accuracy.
* ``fidelity:N``  -- ordinary text: compress the first N tokens, teacher-force the next 64, and
  compare each next-token distribution with the full cache's: KL(full || press) in nats, and
  top-1 agreement (the fraction of positions where both pick the same token).

Question-agnostic by default (kvpress's default: only the context is compressed, the question
comes after); ``--query-aware`` compresses context + question. One JSON line per (sample, press,
ratio) goes to ``samples.jsonl``; samples already there are skipped, so a killed run resumes.
At the end: ``summary.csv`` (mean and 95% CI per press x ratio x task x metric: Wilson interval for
accuracies, percentile bootstrap for KL and top-1) and ``plot.png`` (score vs ratio, one line per
press, CI bands, one panel per task and metric).

    python -m minikv eval --samples 4 --tasks passkey:1024 --out /tmp/ev      # a CPU smoke run
    python -m minikv eval --device cuda --dtype bfloat16 --batch-size 64 --samples 200 --out results/eval
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import get_press
from .registry import MAIN_PRESSES
from .tasks import Sample, make_samples

CONTINUATION_TOKENS = 64  # teacher-forced tokens after the context, for fidelity
HELDOUT_TOKENS = 128  # the true continuation after a natural-text context, for heldout and longppl
METRICS = {"passkey": ["accuracy"], "multifact": ["accuracy"], "fidelity": ["kl", "top1"],
           "heldout": ["fut_err", "win_err", "fut_mass", "win_mass", "shift"],
           "longppl": ["kl", "kl_long", "dnll", "dnll_long", "top1"],
           "qa": ["em", "logp"], "qa0": ["em", "logp"]}
#: metrics where a smaller value is better (the rest: larger is better; "shift" only describes)
LOWER_IS_BETTER = {"fut_err", "win_err", "fut_mass", "win_mass", "kl", "kl_long", "dnll", "dnll_long"}
DESCRIPTIVE = {"shift"}
QA_FULL_CACHE_EM = 0.9  # a QA template counts only if the full cache answers >= 90 % of its questions exactly
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# --------------------------------------------------------------------------------------------
# scoring and confidence intervals
# --------------------------------------------------------------------------------------------
def score_answer(answer: str, expected: str) -> bool:
    """Right iff the first number in ``answer`` with as many digits as ``expected`` is ``expected``.

    Numbers of other lengths are ignored, so "The code of room 314 is 5821." answers 5821, while
    listing a distractor first ("4821 or 5821") is wrong.

    >>> score_answer("The pass key is 35741.", "35741"), score_answer("4821 or 5821", "5821")
    (True, False)
    """
    same_len = [n for n in re.findall(r"\d+", answer) if len(n) == len(expected)]
    return bool(same_len) and same_len[0] == expected


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (stays inside [0, 1], fine at k = 0 or n).

    center = (p + z²/2n) / (1 + z²/n),  half = z sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    >>> [round(x, 4) for x in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so the CSV is reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


# --------------------------------------------------------------------------------------------
# running one batch under one press
# --------------------------------------------------------------------------------------------
def kept_summary(counts: torch.Tensor) -> dict:
    """counts (layers, n_kv) of one batch row -> mean / min / max tokens kept per KV head."""
    c = counts.float()
    return {"kept_mean": round(c.mean().item(), 2), "kept_min": int(c.min()), "kept_max": int(c.max())}


def run_question_batch(model, tok, samples: list[Sample], press, max_new_tokens: int, query_aware: bool) -> list[dict]:
    """Compress the contexts, ask the questions, score the answers: one dict per sample."""
    from .hf import generate

    res = generate(model, tok, [s.context for s in samples], [s.question for s in samples], press=press,
                   max_new_tokens=max_new_tokens, query_aware=query_aware)
    b = len(samples)
    out = []
    for r, (s, ans) in enumerate(zip(samples, res.answers)):
        out.append(dict(context_tokens=res.context_length, answer=ans, expected=s.answer, depth=s.depth,
                        correct=score_answer(ans, s.answer), **kept_summary(res.kept_counts[:, r]),
                        cache_bytes=res.cache_nbytes // b, full_cache_bytes=res.full_cache_nbytes // b))
    return out


@torch.no_grad()
def continuation_logprobs(model, ctx_ids: torch.Tensor, cont_ids: torch.Tensor, press):
    """Prefill ctx_ids (b, L) under ``press``, then teacher-force cont_ids (b, C) on the compressed cache.

    -> (logprobs (b, C, vocab) float32, kept counts (layers, b, n_kv), cache bytes, full cache bytes).
    Row t of the log-probabilities predicts the token after cont_ids[:, t].
    """
    from .hf import cache_kwarg, prefill

    cache, _ = prefill(model, ctx_ids, press)
    kept, nbytes, full = cache.kept_counts(), cache.nbytes(), cache.full_nbytes()
    logits = model(input_ids=cont_ids, use_cache=True, **{cache_kwarg(model): cache}).logits  # (b, C, vocab)
    return torch.log_softmax(logits.float(), dim=-1), kept, nbytes, full


def fidelity_scores(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ref, test (b, C, vocab) log-probabilities -> per row: mean KL(ref || test) and top-1 agreement.

    KL(p || q) = sum_v p_v (log p_v - log q_v), averaged over the C positions.
    """
    kl = (ref.exp() * (ref - test)).sum(-1).clamp_min(0).mean(-1)  # (b,)
    top1 = (ref.argmax(-1) == test.argmax(-1)).float().mean(-1)  # (b,)
    return kl, top1


def run_fidelity_batch(model, ctx_ids, cont_ids, press, ref) -> list[dict]:
    test, kept, nbytes, full = continuation_logprobs(model, ctx_ids, cont_ids, press)
    kl, top1 = fidelity_scores(ref, test)
    b = ctx_ids.shape[0]
    return [dict(context_tokens=ctx_ids.shape[1], kl=round(kl[r].item(), 6), top1=round(top1[r].item(), 6),
                 **kept_summary(kept[:, r]), cache_bytes=nbytes // b, full_cache_bytes=full // b) for r in range(b)]


# --------------------------------------------------------------------------------------------
# batches of equal token length
# --------------------------------------------------------------------------------------------
def parse_tasks(spec: str) -> list[tuple[str, int]]:
    """"passkey:1024,fidelity:768" -> [("passkey", 1024), ("fidelity", 768)]."""
    out = []
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name not in METRICS or not n.isdigit():
            raise ValueError(f"bad task {item!r}: expected NAME:TOKENS with NAME in {', '.join(METRICS)}")
        out.append((name, int(n)))
    return out


def task_label(name: str, n: int) -> str:
    return f"{name}:{n}"


def make_batches(tok, name: str, n_tokens: int, n: int, batch_size: int, seed: int, query_aware: bool) -> list[dict]:
    """Samples 0..n-1 in chunks of batch_size, each chunk split into groups of equal token lengths.

    -> [{"task", "samples", and for fidelity "ctx_ids" (b, L), "cont_ids" (b, C)}]
    """
    from .hf import split_chat_template

    if name in ("heldout", "longppl"):
        from .tasks import natural_text_windows

        ids = natural_text_windows(tok, n_tokens, HELDOUT_TOKENS, n)  # (n, L + C), disjoint windows
        return [dict(task=task_label(name, n_tokens), samples=[Sample(name, n_tokens, i, "") for i in range(a, min(n, a + batch_size))],
                     ids=ids[a:a + batch_size]) for a in range(0, n, batch_size)]
    if name in ("qa", "qa0"):  # qa: each asked fact has a same-template distractor; qa0: none
        from .tasks import qa_sample

        qs = [qa_sample(tok, i, n_tokens, n_distractors=0 if name == "qa0" else 1, seed=seed) for i in range(n)]
        return [dict(task=task_label(name, n_tokens), samples=qs[a:a + batch_size]) for a in range(0, n, batch_size)]
    samples = make_samples(name, n_tokens, n, seed)
    batches = []
    for start in range(0, n, batch_size):
        chunk = samples[start:start + batch_size]
        groups: dict = {}
        if name == "fidelity":
            ids = [tok(s.context, add_special_tokens=False, return_tensors="pt").input_ids[0] for s in chunk]
            need = n_tokens + CONTINUATION_TOKENS
            if min(len(x) for x in ids) < need:
                raise ValueError(f"fidelity:{n_tokens} needs {need} tokens of text; the shipped prose has {min(len(x) for x in ids)}")
            ids = torch.stack([x[:need] for x in ids])  # (b, L + C): cut in tokens, so rows are equal
            batches.append(dict(task=task_label(name, n_tokens), samples=chunk, ctx_ids=ids[:, :n_tokens],
                                cont_ids=ids[:, n_tokens:]))
            continue
        for s in chunk:
            c, q = split_chat_template(tok, s.context, s.question, query_aware)
            groups.setdefault((c.shape[1], q.shape[1]), []).append(s)
        batches += [dict(task=task_label(name, n_tokens), samples=g) for g in groups.values()]
    return batches


def parse_press(spec: str, compression_ratio: float):
    """A press name with optional parameters: "snapkv", "snapkv+window_size=16+pooling=max+kernel_size=7",
    "adakv_snapkv+alpha_safeguard=0.05". Scorer parameters go to the scorer, policy ones to the policy."""
    import inspect

    name, *params = spec.split("+")
    kwargs = {}
    for p in params:
        k, eq, v = p.partition("=")
        if not eq or not k:
            raise ValueError(f"bad press parameter {p!r} in {spec!r}: expected NAME=VALUE")
        kwargs[k] = v if v in ("avg", "max") else (int(v) if v.lstrip("-").isdigit() else float(v))
    press = get_press(name, compression_ratio=compression_ratio)
    if not kwargs:
        return press
    policy_args = set(inspect.signature(type(press).__init__).parameters) - {"self", "scorer", "compression_ratio"}
    scorer_kw = {k: v for k, v in kwargs.items() if k not in policy_args}
    policy_kw = {k: v for k, v in kwargs.items() if k in policy_args}
    press = get_press(name, compression_ratio=compression_ratio, **scorer_kw)
    return type(press)(press.scorer, compression_ratio, **policy_kw) if policy_kw else press


def interleave(lists: list[list]) -> list:
    """Round-robin over the tasks' batch lists, so that a run stopped early has every cell filled a bit."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


# --------------------------------------------------------------------------------------------
# results files
# --------------------------------------------------------------------------------------------
def record_key(rec: dict) -> tuple:
    return (rec["task"], rec["sample"], rec["press"], float(rec["ratio"]), bool(rec.get("query_aware", False)))


def load_records(path: Path) -> list[dict]:
    """The records of samples.jsonl, and of samples.jsonl.gz beside it (how committed results are kept)."""
    import gzip

    recs = []
    gz = Path(str(path) + ".gz")
    for p, opener in ((gz, gzip.open), (Path(path), open)):
        if p.exists():
            with opener(p, "rt", encoding="utf-8") as f:
                recs += _parse_lines(f)
    return recs


def _parse_lines(f) -> list[dict]:
    recs = []
    for line in f:
        line = line.strip()
        if line:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: that sample runs again
                pass
    return recs


def qa_templates_kept(records: list[dict]) -> dict:
    """{task: set of QA templates the full cache answers exactly in >= QA_FULL_CACHE_EM of its questions}."""
    em: dict = {}
    for r in records:
        if r["task"].startswith(("qa:", "qa0:")) and r["press"] == "no_press":
            for q in r["questions"]:
                em.setdefault(r["task"], {}).setdefault(q["template"], []).append(bool(q["em"]))
    return {t: {k for k, v in by.items() if np.mean(v) >= QA_FULL_CACHE_EM} for t, by in em.items()}


def metric_value(rec: dict, metric: str, qa_keep: dict | None = None) -> float:
    """One record's value of a metric (NaN where it does not exist, e.g. no long-dependent token)."""
    if metric == "accuracy":
        return float(bool(rec["correct"]))
    if rec["task"].startswith(("qa:", "qa0:")):
        keep = (qa_keep or {}).get(rec["task"])
        qs = [q for q in rec["questions"] if keep is None or q["template"] in keep]
        if not qs:
            return float("nan")
        return float(np.mean([float(q[metric]) for q in qs]))
    v = rec.get(metric)
    return float("nan") if v is None else float(v)


def summarize(records: list[dict]) -> list[dict]:
    """Mean and 95% CI per (task, metric, press, ratio, query_aware).

    Accuracies get a Wilson interval, everything else a percentile bootstrap of the mean. QA counts
    only the templates on which the full cache scores >= QA_FULL_CACHE_EM exact match.
    """
    qa_keep = qa_templates_kept(records)
    groups: dict = {}
    for r in records:
        name = r["task"].split(":")[0]
        for m in METRICS[name]:
            key = (r["task"], m, r["press"], float(r["ratio"]), bool(r.get("query_aware", False)))
            groups.setdefault(key, []).append(r)
    rows = []
    for (task, m, press, ratio, qa), rs in groups.items():
        if m == "accuracy":
            k, n = sum(bool(r["correct"]) for r in rs), len(rs)
            mean, (lo, hi) = k / n, wilson_interval(k, n)
        else:
            vals = [v for v in (metric_value(r, m, qa_keep) for r in rs) if not math.isnan(v)]
            if not vals:
                continue
            n = len(vals)
            mean, (lo, hi) = float(np.mean(vals)), bootstrap_interval(vals)
        kept = float(np.mean([r["cache_bytes"] / max(1, r["full_cache_bytes"]) for r in rs])) if "cache_bytes" in rs[0] else 1 - ratio
        rows.append(dict(task=task, metric=m, press=press, ratio=ratio, query_aware=qa, n=n, mean=round(mean, 6),
                         ci_low=round(lo, 6), ci_high=round(hi, 6), kept_fraction=round(kept, 4),
                         cache_bytes=int(np.mean([r.get("cache_bytes", 0) for r in rs]))))
    order = {p: i for i, p in enumerate(MAIN_PRESSES)}
    rows.sort(key=lambda r: (r["task"], r["metric"], r["query_aware"], order.get(r["press"], 99), r["press"], r["ratio"]))
    return rows


#: the comparisons the lessons talk about: (a, b) -> "a minus b", paired on the same samples
PAIRS = [("adakv_snapkv", "snapkv"), ("critical_snapkv", "snapkv"), ("critical_adakv_snapkv", "adakv_snapkv"),
         ("critical_adakv_snapkv", "snapkv"), ("snapkv", "streaming_llm"), ("snapkv", "knorm"), ("knorm", "random")]


def paired_pairs(presses) -> list[tuple[str, str]]:
    """PAIRS that are present, plus every ablation "name+param=value" against its plain "name"."""
    have = set(presses)
    out = [(a, b) for a, b in PAIRS if a in have and b in have]
    out += [(p, p.split("+")[0]) for p in sorted(have) if "+" in p and p.split("+")[0] in have]
    return out


def paired_summary(records: list[dict], n_boot: int = 4000) -> list[dict]:
    """Paired differences a - b on the same samples, per task x metric x ratio x pair (see minikv.stats)."""
    from .stats import paired_difference

    qa_keep = qa_templates_kept(records)
    by: dict = {}
    for r in records:
        by.setdefault((r["task"], bool(r.get("query_aware", False)), float(r["ratio"]), r["press"]), {})[r["sample"]] = r
    rows = []
    for task, qa in sorted({(k[0], k[1]) for k in by}):
        kind = task.split(":")[0]
        presses = {k[3] for k in by if k[0] == task and k[1] == qa}
        ratios = sorted({k[2] for k in by if k[0] == task and k[1] == qa and k[3] != "no_press"})
        for m in METRICS[kind]:
            if m in DESCRIPTIVE:
                continue
            for ratio in ratios:
                for a, b in paired_pairs(presses):
                    ra, rb = by.get((task, qa, ratio, a), {}), by.get((task, qa, ratio, b), {})
                    common = sorted(set(ra) & set(rb))
                    if not common:
                        continue
                    x = [metric_value(ra[i], m, qa_keep) for i in common]
                    y = [metric_value(rb[i], m, qa_keep) for i in common]
                    d = paired_difference(x, y, lower_is_better=m in LOWER_IS_BETTER, n_boot=n_boot)
                    if d["n"] == 0:  # the metric exists on no sample (e.g. QA templates the full cache fails)
                        continue
                    rows.append(dict(task=task, query_aware=qa, metric=m, ratio=ratio, a=a, b=b,
                                     lower_is_better=m in LOWER_IS_BETTER, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}))
    return rows


PAIRED_COLUMNS = ["task", "query_aware", "metric", "ratio", "a", "b", "lower_is_better", "n", "mean_a", "mean_b",
                  "mean_diff", "ci_low", "ci_high", "a_wins", "b_wins", "ties"]


def write_paired_csv(rows: list[dict], path: Path) -> None:
    _write_rows(rows, path, PAIRED_COLUMNS)


def read_paired_csv(path) -> list[dict]:
    """paired.csv -> rows with numbers as numbers (for notebooks)."""
    return _read_rows(path, floats=("ratio", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "a_wins", "b_wins", "ties"),
                      ints=("n",), bools=("query_aware", "lower_is_better"))


def plot_paired(rows: list[dict], path=None, metrics=None, pairs=None):
    """Paired difference a - b against the compression ratio, with its 95% bootstrap CI; one panel per
    task x metric, one series per pair. Below the dotted zero line a wins when lower is better."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if (metrics is None or r["metric"] in metrics) and (pairs is None or (r["a"], r["b"]) in pairs)]
    panels = list(dict.fromkeys((r["task"], r["query_aware"], r["metric"]) for r in rows))
    if not panels:
        raise ValueError("no paired rows to plot (check metrics= and pairs=)")
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (task, qa, metric) in zip(axes.flat, panels):
        rs = [r for r in rows if (r["task"], r["query_aware"], r["metric"]) == (task, qa, metric)]
        prs = list(dict.fromkeys((r["a"], r["b"]) for r in rs))
        for j, (a, b) in enumerate(prs):
            pr = sorted((r for r in rs if (r["a"], r["b"]) == (a, b)), key=lambda r: r["ratio"])
            x = np.array([r["ratio"] for r in pr]) + (j - (len(prs) - 1) / 2) * 0.012
            y = np.array([r["mean_diff"] for r in pr])
            err = np.array([[r["mean_diff"] - r["ci_low"] for r in pr], [r["ci_high"] - r["mean_diff"] for r in pr]])
            ax.errorbar(x, y, yerr=err, fmt="o-", ms=3.5, lw=1.2, capsize=2.5, label=f"{a} - {b}")
        ax.axhline(0, color="black", lw=0.8, ls=":")
        better = "lower is better" if rs[0]["lower_is_better"] else "higher is better"
        ax.set_title(f"{task}{' (query-aware)' if qa else ''}: {metric} ({better}), n = {max(r['n'] for r in rs)}", fontsize=9)
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(f"paired difference of {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


SUMMARY_COLUMNS = ["task", "metric", "press", "ratio", "query_aware", "n", "mean", "ci_low", "ci_high", "kept_fraction",
                   "cache_bytes"]


def write_csv(rows: list[dict], path: Path) -> None:
    _write_rows(rows, path, SUMMARY_COLUMNS)


def read_csv(path) -> list[dict]:
    """summary.csv -> rows with numbers as numbers (for notebooks)."""
    return _read_rows(path, floats=("ratio", "mean", "ci_low", "ci_high", "kept_fraction"), ints=("n", "cache_bytes"),
                      bools=("query_aware",))


def _write_rows(rows: list[dict], path: Path, cols: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _read_rows(path, floats=(), ints=(), bools=()) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            r.update({k: float(r[k]) for k in floats})
            r.update({k: int(r[k]) for k in ints})
            r.update({k: r[k] == "True" for k in bools})
            rows.append(r)
    return rows


METRIC_LABELS = {"accuracy": "accuracy", "kl": "KL(full || press), nats / token", "top1": "top-1 agreement with full cache",
                 "fut_err": "output error, held-out queries", "win_err": "output error, window queries (in-sample)",
                 "fut_mass": "evicted attention, held-out queries", "win_mass": "evicted attention, window (in-sample)",
                 "shift": "budget share moved between heads", "kl_long": "KL on long-dependent tokens",
                 "dnll": "NLL(press) - NLL(full), nats / token", "dnll_long": "NLL increase, long-dependent tokens",
                 "em": "exact match", "logp": "log-prob of the gold answer"}


def plot_summary(rows: list[dict], path=None, title: str | None = None):
    """Score vs compression ratio, one line per press with its 95% CI band, one panel per task x metric.

    no_press (ratio 0) is drawn as a dashed horizontal line: the full-cache reference.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = list(METRICS)  # passkey, multifact, fidelity; shorter contexts first
    panels = sorted(dict.fromkeys((r["task"], r["metric"]) for r in rows),
                    key=lambda tm: (kinds.index(tm[0].split(":")[0]), int(tm[0].split(":")[1]), METRICS[tm[0].split(":")[0]].index(tm[1])))
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    colors = dict(zip(MAIN_PRESSES, plt.get_cmap("tab10").colors))
    for ax, (task, metric) in zip(axes.flat, panels):
        rs = [r for r in rows if r["task"] == task and r["metric"] == metric]
        presses = sorted({r["press"] for r in rs}, key=lambda p: (MAIN_PRESSES.index(p) if p in MAIN_PRESSES else 99, p))
        ratios = sorted({r["ratio"] for r in rs if r["press"] != "no_press"}) or [0.0, 1.0]
        for p in presses:
            pr = sorted((r for r in rs if r["press"] == p), key=lambda r: r["ratio"])
            c = colors.get(p, "gray")
            if p == "no_press":
                r = pr[0]
                ax.axhline(r["mean"], color="black", ls="--", lw=1, label="no_press (full cache)")
                ax.axhspan(r["ci_low"], r["ci_high"], color="black", alpha=0.07)
                continue
            x = [r["ratio"] for r in pr]
            ax.plot(x, [r["mean"] for r in pr], "o-", color=c, label=p, lw=1.6, ms=4)
            ax.fill_between(x, [r["ci_low"] for r in pr], [r["ci_high"] for r in pr], color=c, alpha=0.15)
        n = max(r["n"] for r in rs)
        ax.set_title(f"{task}  (n = {n} per point)", fontsize=10)
        ax.set_xlabel("compression ratio (fraction of KV pairs removed)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_xticks(ratios)
        if metric in ("accuracy", "top1", "em"):
            ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07 if len(labels) > 5 else 0.05, 1, 1))
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The eval command's options (defined in the torch-free minikv.cli, so --help needs no torch)."""
    from .cli import add_eval_arguments

    add_eval_arguments(p)


def cells(presses: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(press, ratio) pairs: no_press once at ratio 0, every other press at every ratio."""
    out = [("no_press", 0.0)] if "no_press" in presses else []
    return out + [(p, r) for p in presses if p != "no_press" for r in ratios]


def settings_of(args, model_path: Path) -> dict:
    """Everything besides task, sample, press and ratio that changes a record's result.

    A folder holds records of one setting only: resuming into it with other settings is refused."""
    return dict(model=model_path.name, model_sha256=sha256_of(model_path) if model_path.is_file() else str(model_path.resolve()),
                dtype=args.dtype, seed=args.seed, max_new_tokens=args.max_new_tokens,
                continuation_tokens=CONTINUATION_TOKENS, heldout_tokens=HELDOUT_TOKENS, record_format=2)


def check_settings(out: Path, settings: dict) -> None:
    """Write settings.json on the first run; refuse to mix records of other settings into the folder."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(f"--out {out} holds results made with other settings ({what}). "
                             "Use another --out folder, or remove that folder to start again.")
    elif (out / "samples.jsonl").exists() and (out / "samples.jsonl").stat().st_size:
        raise SystemExit(f"--out {out} holds samples.jsonl without settings.json (an older run); use another --out folder")
    else:
        path.write_text(json.dumps(settings, indent=1))


def repair_tail(path: Path) -> int:
    """Cut a last line that a killed run left half written (no newline at its end). -> bytes removed.

    Every record is written as one line ending in a newline and flushed to disk, so anything after
    the last newline is a record whose sample has not been counted as done: it runs again.
    """
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        block, pos = 1 << 16, size
        while pos > 0:  # search backwards for the last newline
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


def append_records(f, records: list[dict]) -> None:
    """Write whole lines, then flush and fsync: a kill leaves at most one half line, which repair_tail cuts."""
    import os

    f.write("".join(json.dumps(r) + "\n" for r in records))
    f.flush()
    os.fsync(f.fileno())


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "samples.jsonl"
    if args.summary_only:
        return finish(out, load_records(jsonl))

    from .hf import default_model_path, load_model

    t_start = time.time()
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    ratios = [float(r) for r in args.ratios.split(",")]
    tasks = parse_tasks(args.tasks)
    todo_cells = cells(presses, ratios)
    for p, r in todo_cells:
        parse_press(p, r)  # fail early on a bad name, parameter or ratio

    model_path = Path(args.model) if args.model else default_model_path()
    check_settings(out, settings_of(args, model_path))
    if repair_tail(jsonl):
        print(f"{jsonl}: cut a half-written last line (a killed run); that sample runs again")
    model, tok = load_model(model_path, device=args.device, dtype=getattr(torch, args.dtype), quiet=args.no_progress)
    meta = run_metadata(args, model_path)
    (out / "run.json").write_text(json.dumps(meta, indent=1))

    done = {record_key(r) for r in load_records(jsonl)}
    batches = interleave([make_batches(tok, name, n, args.samples, args.batch_size, args.seed, args.query_aware)
                          for name, n in tasks])
    total = sum(len(b["samples"]) for b in batches) * len(todo_cells)
    key = lambda b, s, p, r: (b["task"], s.sample_id, p, float(r), bool(args.query_aware))
    n_done = sum(key(b, s, p, r) in done for b in batches for s in b["samples"] for p, r in todo_cells)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=n_done, desc="eval", unit="sample", disable=args.no_progress, mininterval=2)
    new = 0
    stopped_early = False
    dev = next(model.parameters()).device
    pad_id = _eos_id(model, tok)
    with open(jsonl, "a", encoding="utf-8") as f:
        for batch in batches:
            if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                stopped_early = True
                break
            ref = None  # what every press of this batch is compared with, computed once
            kind = batch["task"].split(":")[0]
            for press_name, ratio in todo_cells:
                pending = [i for i, s in enumerate(batch["samples"]) if key(batch, s, press_name, ratio) not in done]
                if not pending:
                    continue
                samples = [batch["samples"][i] for i in pending]
                press = parse_press(press_name, ratio)
                bar.set_postfix_str(f"{batch['task']} {press_name} {ratio}", refresh=False)
                results = _run_cell(model, tok, kind, batch, pending, samples, press, args, dev, pad_id, ref)
                if isinstance(results, tuple):
                    results, ref = results
                append_records(f, [dict(task=batch["task"], sample=s.sample_id, press=press_name, ratio=ratio,
                                        query_aware=bool(args.query_aware), **res) for s, res in zip(samples, results)])
                new += len(samples)
                bar.update(len(samples))
            ref = None
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    bar.close()
    meta.update(seconds=round(time.time() - t_start, 1), new_records=new, stopped_early=stopped_early)
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    print(f"{new} new records ({n_done} were already there) in {meta['seconds']} s -> {jsonl}")
    return finish(out, load_records(jsonl))


def _run_cell(model, tok, kind, batch, pending, samples, press, args, dev, pad_id, ref):
    """One press x ratio on the pending rows of a batch -> results, or (results, ref) when ref was (re)made."""
    from . import eval_fidelity as ef

    if kind == "heldout":
        if ref is None:  # one uncompressed forward of the whole batch serves every press
            ref = ef.capture_heldout(model, batch["ids"].to(dev), HELDOUT_TOKENS)
        res = ef.run_heldout_batch(ref, batch["ids"].shape[1] - HELDOUT_TOKENS, press)
        return [res[i] for i in pending], ref
    if kind == "longppl":
        ids = batch["ids"].to(dev)
        L = ids.shape[1] - HELDOUT_TOKENS
        if ref is None:
            ref = ef.longppl_reference(model, ids, L)
        sub = {k: v[pending] for k, v in ref.items()}
        return ef.run_longppl_batch(model, ids[pending], L, press, sub), ref
    if kind in ("qa", "qa0"):
        return ef.run_qa_batch(model, samples, press, pad_id)
    if kind == "fidelity":
        ctx, cont = batch["ctx_ids"][pending].to(dev), batch["cont_ids"][pending].to(dev)
        if ref is None or ref[0] != pending:  # the full-cache reference of these rows
            ref = (pending, continuation_logprobs(model, ctx, cont, get_press("no_press"))[0])
        return run_fidelity_batch(model, ctx, cont, press, ref[1]), ref
    return run_question_batch(model, tok, samples, press, args.max_new_tokens, args.query_aware)


def _eos_id(model, tok) -> int:
    from .hf import _eos_ids

    return _eos_ids(model, tok)[0]


def finish(out: Path, records: list[dict]) -> int:
    if not records:
        print("no records yet")
        return 0
    rows = summarize(records)
    write_csv(rows, out / "summary.csv")
    plot_summary(rows, out / "plot.png")
    print_table(rows)
    paired = paired_summary(records)
    if paired:
        write_paired_csv(paired, out / "paired.csv")
        figs = {"paired.png": dict(pairs=PAIRS[:4]), "paired_baselines.png": dict(pairs=PAIRS[4:]),
                "paired_ablations.png": dict(pairs=[p for p in {(r["a"], r["b"]) for r in paired} if "+" in p[0]])}
        for name, kw in figs.items():
            if any((r["a"], r["b"]) in kw["pairs"] for r in paired):
                plot_paired(paired, out / name, **kw)
                print(f"-> {out / name}")
        print(f"-> {out / 'paired.csv'}")
    print(f"-> {out / 'summary.csv'}, {out / 'plot.png'}")
    return 0


def print_table(rows: list[dict]) -> None:
    """One block per task x metric: presses down, ratios across."""
    for task, metric in dict.fromkeys((r["task"], r["metric"]) for r in rows):
        rs = [r for r in rows if r["task"] == task and r["metric"] == metric]
        ratios = sorted({r["ratio"] for r in rs})
        print(f"\n{task}  {metric}  (n per cell: {min(r['n'] for r in rs)}-{max(r['n'] for r in rs)})")
        print(f"{'press':24}" + "".join(f"{x:>9}" for x in ratios))
        for p in dict.fromkeys(r["press"] for r in rs):
            vals = {r["ratio"]: r["mean"] for r in rs if r["press"] == p}
            print(f"{p:24}" + "".join(f"{vals[x]:9.3f}" if x in vals else f"{'':>9}" for x in ratios))


def run_metadata(args, model_path: Path) -> dict:
    import transformers

    dev = args.device
    return dict(
        command="python -m minikv eval " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["eval"] else sys.argv[1:]),
        model=model_path.name, model_sha256=sha256_of(model_path) if model_path.is_file() else None,
        device=dev, gpu=torch.cuda.get_device_name() if dev.startswith("cuda") else None, dtype=args.dtype,
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tasks=args.tasks, presses=args.presses, ratios=args.ratios, samples=args.samples, batch_size=args.batch_size,
        seed=args.seed, query_aware=bool(args.query_aware), max_new_tokens=args.max_new_tokens,
        continuation_tokens=CONTINUATION_TOKENS, cpu_threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
