"""Checkers for exercise 09: a ragged per-head cache (append one token, attend over each head's own tokens).

The cache is plain nested lists: ``keys[r][h]`` is a (n_h, d) tensor holding the n_h tokens that
KV head h of batch row r kept; ``values`` has the same layout.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from . import reference as ref
from ..policies import adakv_keep_mask
from ..budget import n_kept
from ._check import WORKED, Case, Mistake, compare_tensor, fmt, run_checker, seeded, worked


@st.composite
def ragged_caches(draw, min_tokens=0):
    """A random ragged cache (b rows, n_kv heads, n_h tokens each) as dense tensors + keep mask, and g, d."""
    b, n_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d, L = draw(st.sampled_from([2, 4, 8])), draw(st.integers(max(1, min_tokens), 8))
    seed = draw(st.integers(0, 2**20))
    gen = seeded(seed)
    keys, values = torch.randn(b, n_kv, L, d, generator=gen), torch.randn(b, n_kv, L, d, generator=gen)
    keep = torch.rand(b, n_kv, L, generator=gen) < 0.6
    if min_tokens:
        keep[..., 0] = True  # every head keeps at least one token
    counts = keep.sum(-1).tolist()
    return keys, values, keep, g, f"b={b}, n_kv={n_kv}, g={g}, d={d}, tokens per head {counts} (seed {seed})", gen


def _worked_ragged():
    """The worked example compressed by AdaKV (ratio 0.5): heads keep different numbers of tokens."""
    x, _, scores = worked()
    keep = adakv_keep_mask(scores, n_kept(x.context_length, 0.5), 0.2)
    keys, values = ref.to_ragged(x.keys, x.values, keep)
    return x, keys, values


# -- append ---------------------------------------------------------------------------------------


@st.composite
def append_cases(draw):
    keys, values, keep, _, name, gen = draw(ragged_caches())
    b, n_kv, _, d = keys.shape
    k_new, v_new = torch.randn(b, n_kv, d, generator=gen), torch.randn(b, n_kv, d, generator=gen)
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
                n = e.shape[0] - 1
                hints = {(n, e.shape[1]): "the head did not grow: append the new token"}
                problem = compare_tensor(g, e, f"{what}[{r}][{h}] (row {r}, head {h}, {n} tokens + 1 new)",
                                         ("token", "dim"), 0, 0, hints)
                if problem:
                    return problem
    return None


APPEND_MISTAKES = [
    Mistake(lambda ks, vs, k, v: ([[torch.cat([k[r, h, None], t]) for h, t in enumerate(row)] for r, row in enumerate(ks)],
                                  [[torch.cat([v[r, h, None], t]) for h, t in enumerate(row)] for r, row in enumerate(vs)]),
            "the new token goes at the *end* of each head (it is the newest position), not at the front"),
    Mistake(lambda ks, vs, k, v: ref.append_token(ks, vs, v, k),
            "keys and values are swapped: append k_new to keys and v_new to values"),
]


def check_ragged_append(fn) -> None:
    """Exercise 09a: ``fn(keys, values, k_new (b, n_kv, d), v_new (b, n_kv, d)) -> (keys, values)``."""
    x, keys, values = _worked_ragged()
    gen = seeded(1)
    k_new, v_new = torch.randn(1, x.n_kv, x.keys.shape[-1], generator=gen), torch.randn(1, x.n_kv, x.keys.shape[-1], generator=gen)
    case = Case(WORKED + ", compressed by AdaKV", (keys, values, k_new, v_new))
    run_checker("append_token", fn, [case], append_cases(), ref.append_token, _compare_append, APPEND_MISTAKES,
                n_random=30, tol={"atol": 0, "rtol": 0})


# -- attention ------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    keys, values, keep, g, name, gen = draw(ragged_caches(min_tokens=1))
    b, n_kv, _, d = keys.shape
    query = 2 * torch.randn(b, n_kv * g, d, generator=gen)
    ks, vs = ref.to_ragged(keys, values, keep)
    return Case(f"a random cache {name}", (query, ks, vs))


def _attention_variant(scale=True, interleave=False):
    def fn(query, keys, values):
        b, H, d = query.shape
        n_kv = len(keys[0])
        out = torch.empty(b, H, d)
        for r in range(b):
            for h in range(H):
                kv = h % n_kv if interleave else h // (H // n_kv)
                logits = keys[r][kv] @ query[r, h] / (math.sqrt(d) if scale else 1.0)
                out[r, h] = torch.softmax(logits, dim=0) @ values[r][kv]
        return out

    return fn


ATTENTION_MISTAKES = [
    Mistake(_attention_variant(scale=False), "looks like the 1/sqrt(d) scaling of the logits is missing"),
    Mistake(_attention_variant(interleave=True), "GQA grouping: query head h reads KV head h // g, "
            "with g = H // n_kv query heads per KV head"),
]


def check_ragged_attention(fn) -> None:
    """Exercise 09b: ``fn(query (b, H, d), keys, values) -> (b, H, d)``; must equal dense attention with the
    evicted tokens masked to -inf."""
    x, keys, values = _worked_ragged()
    case = Case(WORKED + ", compressed by AdaKV; query = the last window token", (x.queries[:, :, -1], keys, values))

    def compare(got, expected, case):
        problem = compare_tensor(got, expected, "attention output", ("row", "query head", "dim"), 1e-5, 1e-4)
        if problem and isinstance(got, torch.Tensor) and got.shape == expected.shape and got.isnan().any():
            problem += f"\n  hint: NaN in your output (e.g. {fmt(got[got.isnan()][0])}): a softmax over -inf only?"
        return problem

    run_checker("ragged_attention", fn, [case], attention_cases(), ref.ragged_attention, compare,
                ATTENTION_MISTAKES, n_random=30, tol={"atol": 1e-5, "rtol": 1e-4})
