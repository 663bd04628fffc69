"""Checkers for the scoring exercises: 01 SnapKV window scores, 02 pooling + group mean, 07 ||v W_o||_1."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference as ref
from ._check import WORKED, Case, Draw, Mistake, compare_tensor, run_checker, seeded, worked

HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float32, torch.float32, torch.float16, torch.bfloat16]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- 01 window scores -----------------------------------------------------------------------------


def _window_variant(causal=True, shift=0, mask_left=False, scale="sqrt", interleave=False, reduce="mean",
                    renorm=False, softmax_dim=-1, prefix="head"):
    """A (possibly wrong) window-score function: the knobs are the mistakes learners make."""

    def fn(queries, keys):
        b, H, w, d = queries.shape
        n_kv, L = keys.shape[1], keys.shape[2]
        g = H // n_kv
        kv = torch.arange(H) % n_kv if interleave else torch.arange(H) // g  # KV head of each query head
        logits = queries @ keys[:, kv].transpose(-1, -2)  # (b, H, w, L)
        logits = logits / {"sqrt": math.sqrt(d), "none": 1.0, "d": float(d)}[scale]
        if causal:
            row = (torch.arange(w) if mask_left else torch.arange(L - w, L))[:, None] - shift  # (w, 1)
            logits = logits.masked_fill(torch.arange(L)[None, :] > row, float("-inf"))
        a = torch.softmax(logits.float(), dim=softmax_dim).to(queries.dtype)  # (b, H, w, L)
        a = a[..., : L - w] if prefix == "head" else a[..., w:]  # (b, H, w, L-w)
        if renorm:
            a = a / a.sum(-1, keepdim=True)
        return {"mean": a.mean(2), "max": a.amax(2), "sum": a.sum(2)}[reduce]

    return fn


WINDOW_MISTAKES = [
    Mistake(_window_variant(causal=False),
            "the causal mask is missing: window row i is the token at position L - w + i and, as during "
            "prefill, may only attend to keys at positions 0 .. L - w + i",
            "row_pos = torch.arange(L - w, L)[:, None]; key_pos = torch.arange(L)[None, :]; "
            "logits = logits.masked_fill(key_pos > row_pos, float('-inf')) before the softmax"),
    Mistake(_window_variant(shift=1),
            "the causal mask is off by one: a window row may attend to its own position "
            "(keys 0 .. L - w + i, both ends included)",
            "mask where key_pos > row_pos (strictly greater), not key_pos >= row_pos"),
    Mistake(_window_variant(shift=-1),
            "the causal mask is off by one the other way: window row i sees key L - w + i + 1, one step "
            "into its own future",
            "row_pos = torch.arange(L - w, L)[:, None] (the true positions of the window rows)"),
    Mistake(_window_variant(mask_left=True),
            "the window rows are the *last* w tokens: row i sits at position L - w + i and sees keys "
            "0 .. L - w + i, not 0 .. i (the mask's diagonal is shifted by L - w)",
            "torch.ones(w, L, dtype=torch.bool).triu(L - w + 1) is the mask; .triu(1) is for a square "
            "(L, L) matrix"),
    Mistake(_window_variant(scale="none"), "attention logits are scaled by 1/sqrt(d)",
            "logits = queries @ k.transpose(-1, -2) / math.sqrt(d)"),
    Mistake(_window_variant(scale="d"), "the scaling is 1/sqrt(d), not 1/d", "divide by d ** 0.5"),
    Mistake(_window_variant(renorm=True),
            "SnapKV takes the softmax over all L keys and keeps the prefix columns as they are: no "
            "renormalisation after dropping the window columns",
            "return attn[..., :L - w].mean(dim=2) without dividing by attn[..., :L - w].sum(-1)"),
    Mistake(_window_variant(reduce="max"), "SnapKV averages over the w window rows (not the max)",
            ".mean(dim=2), not .amax(dim=2)"),
    Mistake(_window_variant(reduce="sum"), "SnapKV averages over the w window rows (not the sum)",
            ".mean(dim=2), not .sum(dim=2)"),
    Mistake(_window_variant(interleave=True),
            "GQA grouping: the g query heads of one KV head are consecutive, so query head h reads KV "
            "head h // g (not h % n_kv)",
            "keys.repeat_interleave(g, dim=1), not keys.repeat(1, g, 1, 1)"),
    Mistake(_window_variant(softmax_dim=2),
            "the softmax normalises one query's attention over the L keys (the last axis), not over the "
            "window rows", "torch.softmax(logits.float(), dim=-1)"),
    Mistake(_window_variant(prefix="tail"),
            "the scores belong to the L - w prefix tokens, the *first* columns; the window's own columns "
            "are the last w", "attn[..., :L - w], not attn[..., w:]"),
]


def window_cases(draw: Draw):
    b, n_kv, g = draw.int(1, 2), draw.int(1, 3), draw.int(1, 3)
    w = draw.int(1, 6)
    L = draw.int(w + 1, w + 20)
    d = draw.pick([4, 8])
    dtype = draw.pick(DTYPES)
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    queries = (2 * torch.randn(b, n_kv * g, w, d, generator=gen)).to(dtype)  # peaky attention: mistakes show
    keys = torch.randn(b, n_kv, L, d, generator=gen).to(dtype)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, w={w}, L={L}, d={d}, {dtype_name(dtype)} "
                f"(seed {seed})", (queries, keys))


def check_window_scores(fn) -> None:
    """Exercise 01: ``fn(queries (b, H, w, d), keys (b, n_kv, L, d)) -> (b, H, L-w)``."""
    x, w, _ = worked()

    def compare(got, expected, case):
        b, H, n = expected.shape
        queries, keys = case.args
        w, n_kv = queries.shape[2], keys.shape[1]
        hints = {(b, H, n + w): ("the scores are for the L - w tokens *before* the window: drop the w window "
                                 "columns", "attn[..., :L - w]"),
                 (b, H, w, n): ("SnapKV averages over the w window rows", "attn[..., :L - w].mean(dim=2)")}
        if n_kv != H:
            hints[(b, n_kv, n)] = ("exercise 01 returns one score per *query* head; the mean over each "
                                   "GQA group comes in exercise 02", "keep the H axis: (b, H, L - w)")
        return compare_tensor(got, expected, "window scores", ("row", "query head", "token"), 1e-6, 1e-4, hints)

    run_checker("window_scores", fn, [Case(WORKED, (x.queries, x.keys))], window_cases, ref.window_scores,
                compare, WINDOW_MISTAKES, tol={"atol": 1e-6, "rtol": 1e-4})


# -- 02 pooling, group mean, window ---------------------------------------------------------------


def _pool_variant(pad="zeros", pool="avg", group="mean", interleave=False, window_max="global", plus=1.0,
                  fixed_kernel=None, window_value=None):
    def fn(s, n_kv, window_size, kernel_size=5):
        b, H, n = s.shape
        g = H // n_kv
        k = fixed_kernel or kernel_size
        pre = s
        if pool == "max":
            s = F.max_pool1d(s, k, 1, k // 2)
        elif pad == "replicate":
            s = F.avg_pool1d(F.pad(s, (k // 2, k // 2), mode="replicate"), k, 1)
        else:
            s = F.avg_pool1d(s, k, 1, k // 2, count_include_pad=pad == "zeros")
        s = s.reshape(b, g, n_kv, n).transpose(1, 2) if interleave else s.reshape(b, n_kv, g, n)
        s = s.mean(2) if group == "mean" else s.amax(2)  # (b, n_kv, L-w)
        top = {"global": s.max().expand(b, n_kv, 1), "row": s.amax((1, 2), keepdim=True).expand(b, n_kv, 1),
               "head": s.amax(2, keepdim=True), "before": pre.max().expand(b, n_kv, 1)}[window_max]
        win = (top + plus) if window_value is None else torch.full_like(top, window_value)
        return torch.cat([s, win.expand(b, n_kv, window_size).to(s.dtype)], dim=-1)

    return fn


POOL_MISTAKES = [
    Mistake(_pool_variant(pad="exclude"),
            "at the edges you divided by the number of real tokens; SnapKV's average pooling pads with zeros "
            "and still divides every window of kernel_size entries by kernel_size",
            "F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2) -- count_include_pad=True, "
            "the default"),
    Mistake(_pool_variant(pad="replicate"),
            "at the edges you padded with copies of the edge score; SnapKV pads with zeros",
            "F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2) instead of F.pad(..., "
            "mode='replicate')"),
    Mistake(_pool_variant(pool="max"),
            "this is max pooling (the original SnapKV repository's choice); kvpress and minikv use average "
            "pooling", "F.avg_pool1d, not F.max_pool1d"),
    Mistake(_pool_variant(pool="max", fixed_kernel=7),
            "this is the original SnapKV repository's pooling (max pooling, kernel 7); kvpress and minikv "
            "average over the kernel_size you are given", "F.avg_pool1d(s, kernel_size, stride=1, "
                                                          "padding=kernel_size // 2)"),
    Mistake(_pool_variant(fixed_kernel=5), "the pooling window is the kernel_size you are given, not always 5",
            "F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2)"),
    Mistake(_pool_variant(group="max"), "a KV head's score is the *mean* over its g query heads, not the max",
            "reshape to (b, n_kv, g, L - w) and .mean(dim=2)"),
    Mistake(_pool_variant(interleave=True),
            "GQA grouping: query heads k*g .. k*g + g - 1 form KV head k (consecutive heads), not every "
            "n_kv-th head", "s.reshape(b, n_kv, g, L - w), not s.reshape(b, g, n_kv, L - w)"),
    Mistake(_pool_variant(window_max="head"),
            "the window score is max + 1 over the *whole* tensor (all rows and heads), not per head",
            "grouped.max() + 1 (no dim argument)"),
    Mistake(_pool_variant(window_max="row"),
            "the window score is max + 1 over the *whole* tensor, all batch rows included, not per row",
            "grouped.max() + 1 (no dim argument)"),
    Mistake(_pool_variant(window_max="before"),
            "take the max for the window score after pooling and the group mean, not before",
            "grouped = pooled.reshape(b, n_kv, g, L - w).mean(2); window score = grouped.max() + 1"),
    Mistake(_pool_variant(plus=0.0),
            "the window tokens score max + 1, strictly above every prefix token, so a Top-K keeps them first",
            "grouped.max() + 1, not grouped.max()"),
    Mistake(_pool_variant(window_value=float("inf")),
            "the window score is a finite number, max + 1: inf breaks later arithmetic (CriticalKV "
            "multiplies scores, and inf * 0 = nan)", "grouped.max() + 1, not float('inf')"),
]


def pool_cases(draw: Draw):
    b, n_kv, g = draw.int(1, 3), draw.int(1, 3), draw.int(1, 3)
    n, w = draw.int(1, 20), draw.int(1, 6)
    k = draw.pick([5, 5, 3, 7, 9])
    dtype = draw.pick(DTYPES)
    seed = draw.int(0, 2**20)
    s = (torch.rand(b, n_kv * g, n, generator=seeded(seed)) ** 3).to(dtype)  # a few large entries, like attention
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L-w={n}, window_size={w}, kernel_size={k}, "
                f"{dtype_name(dtype)} (seed {seed})", (s, n_kv, w), {"kernel_size": k})


PADDING_HINT = ("the padding depends on the kernel: kernel_size // 2 zeros on each side keep the length (2 is "
                "right only for kernel 5)",
                "F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2)")


def check_pooling(fn) -> None:
    """Exercise 02: ``fn(s (b, H, L-w), n_kv, window_size, kernel_size=5) -> (b, n_kv, L)``."""
    x, w, _ = worked()
    s = ref.window_scores(x.queries, x.keys)

    def compare(got, expected, case):
        s, n_kv, w = case.args
        b, H, n = s.shape
        k = case.kwargs["kernel_size"]
        hints = {(b, n_kv, n): ("the w window tokens are part of the answer: append them, each scoring max + 1",
                                "torch.cat([grouped, window], dim=-1) with window of shape (b, n_kv, w)")}
        if H != n_kv:
            hints[(b, H, n + w)] = ("a KV head's score is the mean over its g query heads",
                                    "reshape to (b, n_kv, g, L - w) and .mean(dim=2) before appending the window")
        if k > 1:
            hints[(b, n_kv, n + w - (k - 1))] = (
                "pooling without padding shortens the sequence; with kernel_size // 2 zeros on each side the "
                "L - w scores stay L - w", "F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2)")
        if k != 5:
            hints.setdefault((b, n_kv, n + w + 5 - k), PADDING_HINT)
        return compare_tensor(got, expected, "SnapKV scores", ("row", "head", "token"), 1e-6, 1e-4, hints)

    run_checker("pool_group_window", fn, [Case(WORKED, (s, x.n_kv, w), {"kernel_size": 5})], pool_cases,
                ref.pool_group_window, compare, POOL_MISTAKES, tol={"atol": 1e-6, "rtol": 1e-4},
                error_hints={"pad should be at most half": PADDING_HINT, "Output size is too small": PADDING_HINT})


# -- 07 projected value norm ----------------------------------------------------------------------


def _norm_variant(p=1, group="mean", interleave=False, raw_view=False, project=True, reduce="sum",
                  cast=True, mean_w=False):
    def fn(values, o_proj):
        b, n_kv, L, d = values.shape
        hidden = o_proj.shape[0]
        H = o_proj.shape[1] // d
        g = H // n_kv
        v_all, w_all = (values.float(), o_proj.float()) if cast else (values, o_proj)
        if not project:
            norms = v_all.norm(p=p, dim=-1)[:, :, None].expand(b, n_kv, g, L)
            return norms.mean(2).float()
        w_o = w_all.reshape(H, d, hidden) if raw_view else w_all.T.reshape(H, d, hidden)  # (H, d, hidden)
        if mean_w:
            w_o = w_o.reshape(n_kv, g, d, hidden).mean(1).repeat_interleave(g, dim=0)
        kv = torch.arange(H) % n_kv if interleave else torch.arange(H) // g
        vw = v_all[:, kv] @ w_o  # (b, H, L, hidden)
        norms = vw.abs().mean(-1) if reduce == "mean" else vw.norm(p=p, dim=-1)  # (b, H, L)
        norms = norms.reshape(b, g, n_kv, L).transpose(1, 2) if interleave else norms.reshape(b, n_kv, g, L)
        return {"mean": norms.mean(2), "max": norms.amax(2), "sum": norms.sum(2)}[group].float()

    return fn


NORM_MISTAKES = [
    Mistake(_norm_variant(p=2), "CriticalKV uses the L1 norm (sum of absolute values), not the L2 norm",
            "(v @ w_o).abs().sum(dim=-1), not .norm(dim=-1)"),
    Mistake(_norm_variant(reduce="mean"), "the L1 norm is the *sum* of the absolute values over the hidden axis, "
            "not their mean", "(v @ w_o).abs().sum(dim=-1), not .abs().mean(dim=-1)"),
    Mistake(_norm_variant(project=False),
            "the norm is of the value *after* the output projection, v · W_o (what the token adds to the "
            "layer's output), not of the value v itself",
            "per_head = (v @ w_o).abs().sum(-1) with w_o = o_proj.float().T.reshape(H, d, hidden)"),
    Mistake(_norm_variant(group="max"), "a KV head's norm is the *mean* over its g query heads, not the max",
            "per_head.reshape(b, n_kv, g, L).mean(dim=2)"),
    Mistake(_norm_variant(group="sum"), "a KV head's norm is the *mean* over its g query heads, not the sum",
            "per_head.reshape(b, n_kv, g, L).mean(dim=2)"),
    Mistake(_norm_variant(mean_w=True),
            "average the g *norms*: ||v · W_o[h]||_1 for each query head h of the group, then the mean; "
            "averaging the g blocks of W_o first gives a different (smaller) number",
            "per_head = (v @ w_o).abs().sum(-1) for all H heads, then .reshape(b, n_kv, g, L).mean(dim=2)"),
    Mistake(_norm_variant(interleave=True),
            "GQA grouping: query head h belongs to KV head h // g (the heads of a group are consecutive)",
            "values.repeat_interleave(g, dim=1), not values.repeat(1, g, 1, 1)"),
    Mistake(_norm_variant(raw_view=True),
            "o_proj is nn.Linear's weight (hidden, H*d) and y = x @ o_proj.T: head h's block is "
            "o_proj[:, h*d:(h+1)*d].T of shape (d, hidden); a plain reshape to (H, d, hidden) mixes heads",
            "w_o = o_proj.float().T.reshape(H, d, hidden)"),
    Mistake(_norm_variant(cast=False),
            "compute in float32: float16/bfloat16 keep only 3 significant digits, and the sum over hidden "
            "loses more", "values.float() and o_proj.float() before the product, not .float() at the end"),
]


def norm_cases(draw: Draw):
    b, n_kv, g = draw.int(1, 2), draw.int(1, 3), draw.int(1, 3)
    L, d = draw.int(1, 12), draw.pick([2, 4, 8])
    hidden = draw.pick([n_kv * g * d, 3, 5, 16])
    dtype = draw.pick(DTYPES)
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    values = (torch.randn(b, n_kv, L, d, generator=gen) * torch.rand(b, n_kv, L, 1, generator=gen) * 2).to(dtype)
    o_proj = (torch.randn(hidden, n_kv * g * d, generator=gen) / d**0.5).to(dtype)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L={L}, d={d}, hidden={hidden}, "
                f"{dtype_name(dtype)} (seed {seed})", (values, o_proj))


def check_value_norm(fn) -> None:
    """Exercise 07: ``fn(values (b, n_kv, L, d), o_proj (hidden, H*d)) -> (b, n_kv, L)`` float32."""
    x, _, _ = worked()

    def compare(got, expected, case):
        problem = compare_tensor(got, expected, "projected value norm", ("row", "head", "token"), 1e-4, 1e-4)
        if problem and "wrong dtype" in problem:
            problem += ("\n  (the result is float32 whatever the inputs' dtype: cast values and o_proj with "
                        ".float() first)")
        return problem

    run_checker("projected_value_norm", fn, [Case(WORKED, (x.values, x.o_proj))], norm_cases,
                ref.projected_value_norm, compare, NORM_MISTAKES, tol={"atol": 1e-4, "rtol": 1e-4})
