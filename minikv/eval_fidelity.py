"""The evaluation's fidelity tasks: what the presses optimise, measured on held-out text.

* ``heldout:N`` -- N tokens of natural text (:func:`minikv.tasks.natural_text_windows`) are the
  context, the next C its true continuation. One uncompressed forward gives every layer's keys,
  values and queries; each press then selects from the context (its window = the last context
  tokens) and :func:`minikv.fidelity.layer_fidelity` measures, per layer and KV head, the relative
  error of the attention output after o_proj and the attention mass on evicted tokens -- for the C
  continuation queries (held out) and for the window queries that chose the tokens (in-sample).
* ``longppl:N`` -- the same windows decoded for real: the compressed cache teacher-forces the
  continuation; per token NLL and KL(full || press), on all tokens and on those whose prediction
  needs the distant context (LongPPL's criterion: the full context beats the last 128 tokens by
  more than 2 nats).
* ``qa:N`` -- facts and same-template distractors in natural prose (:func:`minikv.tasks.qa_sample`),
  compressed question-agnostically (template + instruction + notes, kvpress's default), then several
  questions on copies of the same compressed cache, each scored by the teacher-forced log-prob of
  the gold answer after an answer prefix and by exact match (greedy would produce it).
"""

from __future__ import annotations

import copy

import torch

from .fidelity import budget_shift, layer_fidelity, long_dependent_tokens
from .scorers.base import LayerInputs

WINDOW = 64  # the in-sample queries: the last 64 context tokens (SnapKV's default window)
SHORT_CONTEXT = 128  # LongPPL's short context: the last 128 context tokens
LONG_THRESHOLD = 2.0  # nats; LongPPL's LSD threshold


def _r(x, nd=5):
    return [round(float(v), nd) for v in x]


# --------------------------------------------------------------------------------------------
# heldout: attention-output error of the kept set, future queries vs window queries
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def capture_heldout(model, ids: torch.Tensor, n_cont: int):
    """One uncompressed forward of context + continuation: {layer: LayerInputs} with the queries of
    the last WINDOW context tokens and of the n_cont continuation tokens."""
    from .hf import capture_layers

    return capture_layers(model, ids, n_queries=WINDOW + n_cont)


def run_heldout_batch(layers: dict, context_length: int, press) -> list[dict]:
    """Per sample (batch row): per-layer / per-head errors and evicted masses of ``press``'s selection."""
    L = context_length
    per = {k: [] for k in ("fut_err", "win_err", "fut_mass", "win_mass", "fut_head_err", "fut_head_mass", "shift", "kept")}
    for i, li in layers.items():
        view = LayerInputs(li.keys[:, :, :L], li.values[:, :, :L], li.queries[:, :, :WINDOW], li.o_proj)
        sel = press.select(view)
        r = layer_fidelity(li, L, WINDOW, sel.keep)
        per["fut_err"].append(r["future"]["layer_err"])  # (b,)
        per["win_err"].append(r["window"]["layer_err"])
        per["fut_mass"].append(r["future"]["layer_mass"])
        per["win_mass"].append(r["window"]["layer_mass"])
        per["fut_head_err"].append(r["future"]["head_err"])  # (b, n_kv)
        per["fut_head_mass"].append(r["future"]["head_mass"])
        per["shift"].append(budget_shift(sel.counts))  # (b,)
        per["kept"].append(sel.counts)  # (b, n_kv)
    st = {k: torch.stack(v, 1).float().cpu() for k, v in per.items()}  # (b, layers[, n_kv])
    out = []
    for r in range(st["fut_err"].shape[0]):
        out.append(dict(
            context_tokens=L,
            fut_err=round(st["fut_err"][r].mean().item(), 6), win_err=round(st["win_err"][r].mean().item(), 6),
            fut_mass=round(st["fut_mass"][r].mean().item(), 6), win_mass=round(st["win_mass"][r].mean().item(), 6),
            shift=round(st["shift"][r].mean().item(), 6),
            layers=dict(fut_err=_r(st["fut_err"][r]), win_err=_r(st["win_err"][r]), fut_mass=_r(st["fut_mass"][r]),
                        win_mass=_r(st["win_mass"][r]), shift=_r(st["shift"][r], 4),
                        fut_head_err=[_r(h, 4) for h in st["fut_head_err"][r]],
                        fut_head_mass=[_r(h, 4) for h in st["fut_head_mass"][r]],
                        kept=st["kept"][r].long().tolist()),
        ))
    return out


# --------------------------------------------------------------------------------------------
# longppl: the compressed cache decodes the true continuation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logits(model, ctx: torch.Tensor, cont: torch.Tensor, press) -> torch.Tensor:
    """Log-probs (b, C, vocab), float32, of the C continuation tokens under ``press`` (row t predicts cont[:, t])."""
    from .hf import cache_kwarg, prefill

    cache, last = prefill(model, ctx, press)  # last: (b, vocab), predicts cont[:, 0]
    rest = model(input_ids=cont[:, :-1], use_cache=True, **{cache_kwarg(model): cache}).logits  # (b, C-1, vocab)
    return torch.log_softmax(torch.cat([last[:, None], rest], 1).float(), dim=-1)


@torch.no_grad()
def longppl_reference(model, ids: torch.Tensor, context_length: int) -> dict:
    """The full cache's log-probs (b, C, vocab), the targets' log-probs with the full and with the
    short context (b, C), and which targets are long-dependent (b, C)."""
    L = context_length
    ctx, cont = ids[:, :L], ids[:, L:]
    full = continuation_logits(model, ctx, cont, None)
    short_logits = model(input_ids=ids[:, L - SHORT_CONTEXT:-1]).logits[:, SHORT_CONTEXT - 1:]  # (b, C, vocab)
    short = torch.log_softmax(short_logits.float(), -1).gather(-1, cont[..., None])[..., 0]  # (b, C)
    lp_full = full.gather(-1, cont[..., None])[..., 0]  # (b, C)
    return dict(full=full, lp_full=lp_full, lp_short=short, long=long_dependent_tokens(lp_full, short, LONG_THRESHOLD))


def run_longppl_batch(model, ids: torch.Tensor, context_length: int, press, ref: dict) -> list[dict]:
    L = context_length
    cont = ids[:, L:]
    test = continuation_logits(model, ids[:, :L], cont, press)  # (b, C, vocab)
    kl = (ref["full"].exp() * (ref["full"] - test)).sum(-1).clamp_min(0)  # (b, C)
    lp = test.gather(-1, cont[..., None])[..., 0]  # (b, C)
    dnll = ref["lp_full"] - lp  # (b, C): NLL(press) - NLL(full)
    top1 = (ref["full"].argmax(-1) == test.argmax(-1)).float()
    out = []
    for r in range(ids.shape[0]):
        m = ref["long"][r]
        n_long = int(m.sum())
        out.append(dict(
            context_tokens=L, kl=round(kl[r].mean().item(), 6), dnll=round(dnll[r].mean().item(), 6),
            top1=round(top1[r].mean().item(), 6), n_long=n_long,
            kl_long=round(kl[r][m].mean().item(), 6) if n_long else None,
            dnll_long=round(dnll[r][m].mean().item(), 6) if n_long else None,
            nll_full=round(-ref["lp_full"][r].mean().item(), 6),
        ))
    return out


# --------------------------------------------------------------------------------------------
# qa: several questions on one compressed context
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def run_qa_batch(model, samples: list, press, pad_id: int) -> list[dict]:
    """Compress the samples' contexts once, then ask each question on a copy of the cache.

    Rows of a question are right-padded: padding comes after every real token, so causal attention
    never lets a real token see it.
    """
    from .hf import cache_kwarg, prefill

    dev = next(model.parameters()).device
    ctx = torch.tensor([s.context_ids for s in samples], device=dev)  # (b, L)
    cache, _ = prefill(model, ctx, press)
    n_q = len(samples[0].questions)
    per_q = []
    for qi in range(n_q):
        rows, spans = [], []
        for s in samples:
            q = s.questions[qi]
            seq = q["question_ids"] + q["prefix_ids"] + q["answer_ids"]
            a0 = len(q["question_ids"]) + len(q["prefix_ids"])
            rows.append(seq)
            spans.append((a0, len(q["answer_ids"])))
        width = max(len(x) for x in rows)
        batch = torch.tensor([x + [pad_id] * (width - len(x)) for x in rows], device=dev)  # (b, width)
        c = copy.deepcopy(cache) if qi < n_q - 1 else cache
        logits = model(input_ids=batch, use_cache=True, **{cache_kwarg(model): c}).logits.float()  # (b, width, vocab)
        res = []
        for r, (a0, n_a) in enumerate(spans):
            pred = logits[r, a0 - 1:a0 - 1 + n_a]  # (n_a, vocab): position t predicts token t + 1
            gold = batch[r, a0:a0 + n_a]
            lp = torch.log_softmax(pred, -1).gather(-1, gold[:, None])[:, 0]
            res.append((lp.sum().item(), bool((pred.argmax(-1) == gold).all())))
        per_q.append(res)
    out = []
    for r, s in enumerate(samples):
        qs = [dict(template=q["template"], depth=q["depth"], logp=round(per_q[i][r][0], 5), em=per_q[i][r][1])
              for i, q in enumerate(s.questions)]
        out.append(dict(context_tokens=len(s.context_ids), questions=qs))
    return out
