"""Checkers for exercise 09: a ragged per-head cache (append one token, attend over each head's own tokens).

The cache is plain nested lists: ``keys[r][h]`` is a (n_h, d) tensor holding the n_h tokens that
KV head h of batch row r kept; ``values`` has the same layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference as ref
from ..policies import adakv_keep_mask
from ..budget import n_kept
from ._check import WORKED, Case, Draw, Mistake, compare_tensor, hint_text, run_checker, seeded, worked


def ragged_caches(draw: Draw, min_tokens=0, dtypes=(torch.float32,)):
    """A random ragged cache (b rows, n_kv heads, n_h tokens each) as dense tensors + keep mask, and g, d."""
    b, n_kv, g = draw.int(1, 3), draw.int(1, 3), draw.int(1, 3)
    d, L = draw.pick([2, 4, 8]), draw.int(max(1, min_tokens), 8)
    dtype = draw.pick(dtypes)
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    keys = torch.randn(b, n_kv, L, d, generator=gen).to(dtype)
    values = torch.randn(b, n_kv, L, d, generator=gen).to(dtype)
    keep = torch.rand(b, n_kv, L, generator=gen) < 0.6
    if min_tokens:
        keep[..., 0] = True  # every head keeps at least one token
    counts = keep.sum(-1).tolist()
    name = f"b={b}, n_kv={n_kv}, g={g}, d={d}, tokens per head {counts}"
    if dtype != torch.float32:
        name += ", " + str(dtype).replace("torch.", "")
    return keys, values, keep, g, f"{name} (seed {seed})", gen


def _worked_ragged():
    """The worked example compressed by AdaKV (ratio 0.5): heads keep different numbers of tokens."""
    x, _, scores = worked()
    keep = adakv_keep_mask(scores, n_kept(x.context_length, 0.5), 0.2)
    keys, values = ref.to_ragged(x.keys, x.values, keep)
    return x, keys, values


# -- append ---------------------------------------------------------------------------------------


def append_cases(draw: Draw):
    keys, values, keep, _, name, gen = ragged_caches(draw, dtypes=(torch.float32, torch.float32, torch.bfloat16))
    b, n_kv, _, d = keys.shape
    k_new = torch.randn(b, n_kv, d, generator=gen).to(keys.dtype)
    v_new = torch.randn(b, n_kv, d, generator=gen).to(keys.dtype)
    ks, vs = ref.to_ragged(keys, values, keep)
    return Case(f"a random cache {name}", (ks, vs, k_new, v_new))


def _compare_append(got, expected, case):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return "append_token must return a pair (keys, values) of nested lists"
    for what, g_all, e_all in zip(("keys", "values"), got, expected):
        if not isinstance(g_all, (list, tuple)) or len(g_all) != len(e_all):
            return f"{what}: expected a list of {len(e_all)} batch rows, got {type(g_all).__name__}"
        for r, (g_row, e_row) in enumerate(zip(g_all, e_all)):
            if not isinstance(g_row, (list, tuple)) or len(g_row) != len(e_row):
                return f"{what}[{r}]: expected a list of {len(e_row)} KV heads"
            for h, (g, e) in enumerate(zip(g_row, e_row)):
                n, n_kv = e.shape[0] - 1, len(e_row)
                hints = {(n, e.shape[1]): ("every head grows by one token: the new one",
                                           "torch.cat([k, k_new[r, h][None]])")}
                if n_kv > 1:
                    hints[(n + n_kv, e.shape[1])] = ("head h of row r gets only its own new token, k_new[r, h], "
                                                     "not the new tokens of every head",
                                                     "k_new[r, h][None], not k_new[r]")
                problem = compare_tensor(g, e, f"{what}[{r}][{h}] (row {r}, head {h}, {n} tokens + 1 new)",
                                         ("token", "dim"), 0, 0, hints)
                if problem:
                    return problem
    return None


def _append_variant(front=False, swap=False, same_head=False):
    def fn(keys, values, k_new, v_new):
        if swap:
            k_new, v_new = v_new, k_new
        out = []
        for cache, new in ((keys, k_new), (values, v_new)):
            rows = []
            for r, row in enumerate(cache):
                heads = []
                for h, t in enumerate(row):
                    token = new[r, 0 if same_head else h][None]  # (1, d)
                    heads.append(torch.cat([token, t] if front else [t, token]))
                rows.append(heads)
            out.append(rows)
        return tuple(out)

    return fn


APPEND_MISTAKES = [
    Mistake(_append_variant(front=True),
            "the new token is the newest position, so it goes at the *end* of each head, not at the front",
            "torch.cat([keys[r][h], k_new[r, h][None]]), old tokens first"),
    Mistake(_append_variant(swap=True), "keys and values are swapped: k_new goes to the keys, v_new to the values",
            "append_token(keys, values, k_new, v_new): keys[r][h] gets k_new[r, h]"),
    Mistake(_append_variant(same_head=True),
            "every head gets its own new token: k_new is (b, n_kv, d), row first, then head",
            "k_new[r, h], not k_new[r, 0]"),
]


def check_ragged_append(fn) -> None:
    """Exercise 09a: ``fn(keys, values, k_new (b, n_kv, d), v_new (b, n_kv, d)) -> (keys, values)``."""
    x, keys, values = _worked_ragged()
    gen = seeded(1)
    d = x.keys.shape[-1]
    k_new, v_new = torch.randn(1, x.n_kv, d, generator=gen), torch.randn(1, x.n_kv, d, generator=gen)
    case = Case(WORKED + ", compressed by AdaKV", (keys, values, k_new, v_new))
    run_checker("append_token", fn, [case], append_cases, ref.append_token, _compare_append, APPEND_MISTAKES,
                n_random=30, tol={"atol": 0, "rtol": 0})


# -- attention ------------------------------------------------------------------------------------


def attention_cases(draw: Draw):
    keys, values, keep, g, name, gen = ragged_caches(draw, min_tokens=1, dtypes=(torch.float32, torch.float32,
                                                                                torch.bfloat16))
    b, n_kv, _, d = keys.shape
    query = (2 * torch.randn(b, n_kv * g, d, generator=gen)).to(keys.dtype)
    ks, vs = ref.to_ragged(keys, values, keep)
    return Case(f"a random cache {name}", (query, ks, vs))


def _attention_variant(scale=True, interleave=False, pad_zero=False, softmax_dim=-1):
    def fn(query, keys, values):
        b, H, d = query.shape
        n_kv = len(keys[0])
        n = max(k.shape[0] for row in keys for k in row)
        out = torch.empty(b, H, d, dtype=values[0][0].dtype)
        for r in range(b):
            for h in range(H):
                kv = h % n_kv if interleave else h // (H // n_kv)
                k, v = keys[r][kv], values[r][kv]
                if pad_zero:  # padded to the longest head, padding not masked
                    k, v = F.pad(k, (0, 0, 0, n - k.shape[0])), F.pad(v, (0, 0, 0, n - v.shape[0]))
                logits = (k @ query[r, h] / (math.sqrt(d) if scale else 1.0)).float()  # (n_h,)
                if softmax_dim == -1:
                    weights = torch.softmax(logits, dim=0)
                else:  # over the query heads of the group, per token
                    g = H // n_kv
                    group = keys[r][kv] @ query[r, kv * g:(kv + 1) * g].T / math.sqrt(d)  # (n_h, g)
                    weights = torch.softmax(group.float(), dim=1)[:, h - kv * g]
                out[r, h] = (weights.to(v.dtype) @ v)
        return out

    return fn


ATTENTION_MISTAKES = [
    Mistake(_attention_variant(scale=False), "attention logits are scaled by 1/sqrt(d)",
            "logits = q @ keys[r][k].T / math.sqrt(d)"),
    Mistake(_attention_variant(interleave=True),
            "GQA grouping: query head h reads KV head h // g, with g = H // n_kv consecutive query heads per KV head",
            "kv = h // g, not h % n_kv"),
    Mistake(_attention_variant(pad_zero=True),
            "a head attends over its own n_h tokens only: if you pad the heads to one length, the padding must "
            "get -inf logits (a zero key still gets weight exp(0))",
            "logits.masked_fill(~real_token, float('-inf')) before the softmax -- or loop over the heads and "
            "use keys[r][k] as it is"),
    Mistake(_attention_variant(softmax_dim=1),
            "the softmax runs over a head's *tokens*: each query's weights sum to 1 over the n_h tokens",
            "weights = torch.softmax(q @ keys[r][k].T / sqrt(d), dim=-1) with q of shape (g, d)"),
]


def check_ragged_attention(fn) -> None:
    """Exercise 09b: ``fn(query (b, H, d), keys, values) -> (b, H, d)``; must equal dense attention with the
    evicted tokens masked to -inf."""
    x, keys, values = _worked_ragged()
    case = Case(WORKED + ", compressed by AdaKV; query = the last window token", (x.queries[:, :, -1], keys, values))

    def compare(got, expected, case):
        # a weighted sum of values can cancel to ~0: in bfloat16 its rounding error is absolute, not relative
        atol = 1.5e-2 if expected.dtype == torch.bfloat16 else 1e-5
        problem = compare_tensor(got, expected, "attention output", ("row", "query head", "dim"), atol, 1e-4)
        if problem and isinstance(got, torch.Tensor) and got.shape == expected.shape and got.isnan().any():
            problem += hint_text("NaN in your output: a softmax over a row that is -inf everywhere gives NaN",
                                 "every head here keeps at least one token; mask only the padding, if you pad")
        return problem

    run_checker("ragged_attention", fn, [case], attention_cases, ref.ragged_attention, compare,
                ATTENTION_MISTAKES, n_random=30, tol={"atol": 1e-5, "rtol": 1e-4},
                error_hints={"index": ("query head h reads KV head h // g: there are only n_kv KV heads per row",
                                       "g = H // len(keys[0]); keys[r][h // g]")})
