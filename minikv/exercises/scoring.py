"""Checkers for the scoring exercises: 01 SnapKV window scores, 02 pooling + group mean, 07 ||v W_o||_1."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from . import reference as ref
from ._check import WORKED, Case, Mistake, compare_tensor, run_checker, seeded, worked

# -- 01 window scores -----------------------------------------------------------------------------


def _window_variant(causal=True, scale=True, interleave=False, shift=0, reduce="mean", renorm=False):
    """A (possibly wrong) window-score function: the knobs are the mistakes learners make."""

    def fn(queries, keys):
        b, H, w, d = queries.shape
        n_kv, L = keys.shape[1], keys.shape[2]
        g = H // n_kv
        kv = torch.arange(H) % n_kv if interleave else torch.arange(H) // g  # KV head of each query head
        logits = queries @ keys[:, kv].transpose(-1, -2)  # (b, H, w, L)
        if scale:
            logits = logits / math.sqrt(d)
        if causal:
            row = torch.arange(L - w, L)[:, None] - shift
            logits = logits.masked_fill(torch.arange(L)[None, :] > row, float("-inf"))
        a = torch.softmax(logits.float(), dim=-1)[..., : L - w]  # (b, H, w, L-w)
        if renorm:
            a = a / a.sum(-1, keepdim=True)
        a = {"mean": a.mean(2), "max": a.amax(2), "sum": a.sum(2)}[reduce]
        return a.to(queries.dtype)

    return fn


WINDOW_MISTAKES = [
    Mistake(_window_variant(causal=False), "looks like the causal mask is missing: window row i is the token at "
            "position L-w+i and may only see keys 0 .. L-w+i (mask the later ones with -inf before the softmax)"),
    Mistake(_window_variant(shift=1), "the causal mask is off by one: window row i sees keys up to L-w+i "
            "*including* its own position"),
    Mistake(_window_variant(scale=False), "looks like the 1/sqrt(d) scaling of the logits is missing"),
    Mistake(_window_variant(renorm=True), "looks like you renormalised after dropping the window columns; SnapKV "
            "takes the softmax over all L keys and then just keeps the first L-w columns"),
    Mistake(_window_variant(reduce="max"), "looks like max over the w window rows; SnapKV takes the mean"),
    Mistake(_window_variant(reduce="sum"), "looks like a sum over the w window rows; SnapKV takes the mean"),
    Mistake(_window_variant(interleave=True), "GQA grouping: query head h belongs to KV head h // g "
            "(the g heads of a group are consecutive), not h % n_kv"),
]


@st.composite
def window_cases(draw):
    b, n_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    w = draw(st.integers(1, 6))
    L = draw(st.integers(w + 1, w + 20))
    d = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**20))
    gen = seeded(seed)
    queries = 2 * torch.randn(b, n_kv * g, w, d, generator=gen)  # peaky attention: mistakes show
    keys = torch.randn(b, n_kv, L, d, generator=gen)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, w={w}, L={L}, d={d} (seed {seed})", (queries, keys))


def check_window_scores(fn) -> None:
    """Exercise 01: ``fn(queries (b, H, w, d), keys (b, n_kv, L, d)) -> (b, H, L-w)``."""
    x, w, _ = worked()

    def compare(got, expected, case):
        b, H, n = expected.shape
        hints = {(b, H, n + case.args[0].shape[2]): "you kept the w window columns too: keep only the L-w prefix",
                 (b, H, case.args[0].shape[2], n): "you kept the window rows: take the mean over them (axis 2)"}
        return compare_tensor(got, expected, "window scores", ("row", "query head", "token"), 1e-6, 1e-4, hints)

    run_checker("window_scores", fn, [Case(WORKED, (x.queries, x.keys))], window_cases(), ref.window_scores,
                compare, WINDOW_MISTAKES, tol={"atol": 1e-6, "rtol": 1e-4})


# -- 02 pooling, group mean, window ---------------------------------------------------------------


def _pool_variant(include_pad=True, pool="avg", group="mean", interleave=False, window_max="global"):
    def fn(s, n_kv, window_size, kernel_size=5):
        b, H, n = s.shape
        g = H // n_kv
        pre = s
        if pool == "avg":
            s = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2, count_include_pad=include_pad)
        else:
            s = F.max_pool1d(s, kernel_size, 1, kernel_size // 2)
        s = s.reshape(b, g, n_kv, n).transpose(1, 2) if interleave else s.reshape(b, n_kv, g, n)
        s = s.mean(2) if group == "mean" else s.amax(2)  # (b, n_kv, L-w)
        top = {"global": s.max().expand(b, n_kv, 1), "row": s.amax((1, 2), keepdim=True).expand(b, n_kv, 1),
               "head": s.amax(2, keepdim=True), "before": pre.max().expand(b, n_kv, 1)}[window_max]
        return torch.cat([s, (top + 1).expand(b, n_kv, window_size)], dim=-1)

    return fn


POOL_MISTAKES = [
    Mistake(_pool_variant(include_pad=False), "at the edges you divided by the number of real tokens; SnapKV's "
            "avg-pool counts the zero padding (every output is a sum of kernel_size entries / kernel_size)"),
    Mistake(_pool_variant(pool="max"), "looks like max-pooling (the original SnapKV repo's choice); kvpress and "
            "minikv use average pooling"),
    Mistake(_pool_variant(group="max"), "looks like max over the g query heads of a group instead of the mean"),
    Mistake(_pool_variant(interleave=True), "GQA grouping: query heads k*g .. k*g+g-1 form KV head k "
            "(reshape to (b, n_kv, g, L-w)), not every n_kv-th head"),
    Mistake(_pool_variant(window_max="head"), "the window score is max + 1 over the *whole* tensor "
            "(all rows and heads), not per head"),
    Mistake(_pool_variant(window_max="row"), "the window score is max + 1 over the *whole* tensor "
            "(all rows), not per batch row"),
    Mistake(_pool_variant(window_max="before"), "take the max for the window score after pooling and "
            "the group mean, not before"),
]


@st.composite
def pool_cases(draw):
    b, n_kv, g = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n, w = draw(st.integers(1, 20)), draw(st.integers(1, 6))
    k = draw(st.sampled_from([5, 5, 3, 7]))
    seed = draw(st.integers(0, 2**20))
    s = torch.rand(b, n_kv * g, n, generator=seeded(seed)) ** 3  # a few large entries, like attention
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L-w={n}, w={w}, kernel_size={k} (seed {seed})",
                (s, n_kv, w), {"kernel_size": k})


def check_pooling(fn) -> None:
    """Exercise 02: ``fn(s (b, H, L-w), n_kv, window_size, kernel_size=5) -> (b, n_kv, L)``."""
    x, w, _ = worked()
    s = ref.window_scores(x.queries, x.keys)

    def compare(got, expected, case):
        s, n_kv, w = case.args
        b, H, n = s.shape
        k = case.kwargs["kernel_size"]
        hints = {(b, n_kv, n + w - (k - 1)): "pooling without padding changes the length: pad kernel_size // 2 "
                 "zeros on each side so that L-w scores stay L-w",
                 (b, n_kv, n): "you forgot to append the w window tokens (score = max + 1)",
                 (b, H, n + w): "you forgot the mean over the g query heads of each KV head"}
        if k != 5:
            hints[(b, n_kv, n + w + 5 - k)] = "padding must be kernel_size // 2 (you used 2, right only for kernel 5)"
        return compare_tensor(got, expected, "SnapKV scores", ("row", "head", "token"), 1e-6, 1e-4, hints)

    run_checker("pool_group_window", fn, [Case(WORKED, (s, x.n_kv, w), {"kernel_size": 5})], pool_cases(),
                ref.pool_group_window, compare, POOL_MISTAKES, tol={"atol": 1e-6, "rtol": 1e-4})


# -- 07 projected value norm ----------------------------------------------------------------------


def _norm_variant(p=1, group="mean", interleave=False, raw_view=False):
    def fn(values, o_proj):
        b, n_kv, L, d = values.shape
        hidden = o_proj.shape[0]
        H = o_proj.shape[1] // d
        g = H // n_kv
        w_o = o_proj.float().reshape(H, d, hidden) if raw_view else o_proj.float().T.reshape(H, d, hidden)
        kv = torch.arange(H) % n_kv if interleave else torch.arange(H) // g
        vw = values.float()[:, kv] @ w_o  # (b, H, L, hidden)
        norms = vw.norm(p=p, dim=-1)  # (b, H, L)
        norms = norms.reshape(b, g, n_kv, L).transpose(1, 2) if interleave else norms.reshape(b, n_kv, g, L)
        return {"mean": norms.mean(2), "max": norms.amax(2), "sum": norms.sum(2)}[group]

    return fn


NORM_MISTAKES = [
    Mistake(_norm_variant(p=2), "looks like the L2 norm; CriticalKV uses the L1 norm (sum of absolute values)"),
    Mistake(_norm_variant(group="max"), "looks like max over the g query heads of a group; take the mean"),
    Mistake(_norm_variant(group="sum"), "looks like a sum over the g query heads of a group; take the mean"),
    Mistake(_norm_variant(interleave=True), "GQA grouping: query head h belongs to KV head h // g"),
    Mistake(_norm_variant(raw_view=True), "o_proj is nn.Linear's weight (hidden, H*d) and y = x @ o_proj.T: head h's "
            "block is o_proj[:, h*d:(h+1)*d].T of shape (d, hidden); a plain reshape to (H, d, hidden) mixes heads"),
]


@st.composite
def norm_cases(draw):
    b, n_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    L, d = draw(st.integers(1, 12)), draw(st.sampled_from([2, 4, 8]))
    hidden = draw(st.sampled_from([n_kv * g * d, 3, 5, 16]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**20))
    gen = seeded(seed)
    values = (torch.randn(b, n_kv, L, d, generator=gen) * torch.rand(b, n_kv, L, 1, generator=gen) * 2).to(dtype)
    o_proj = (torch.randn(hidden, n_kv * g * d, generator=gen) / d**0.5).to(dtype)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L={L}, d={d}, hidden={hidden}, "
                f"{str(dtype).replace('torch.', '')} (seed {seed})", (values, o_proj))


def check_value_norm(fn) -> None:
    """Exercise 07: ``fn(values (b, n_kv, L, d), o_proj (hidden, H*d)) -> (b, n_kv, L)`` float32."""
    x, _, _ = worked()

    def compare(got, expected, case):
        problem = compare_tensor(got, expected, "projected value norm", ("row", "head", "token"), 1e-4, 1e-4)
        if problem and "wrong dtype" in problem:
            problem += "\n  hint: cast values and o_proj to float32 first (.float()); the result is float32"
        return problem

    run_checker("projected_value_norm", fn, [Case(WORKED, (x.values, x.o_proj))], norm_cases(),
                ref.projected_value_norm, compare, NORM_MISTAKES, tol={"atol": 1e-4, "rtol": 1e-4})
