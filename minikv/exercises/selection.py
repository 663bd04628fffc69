"""Checkers for the selection exercises: 03 uniform Top-K, 04 safeguard, 05 AdaKV global selection,
06 a head's floor and ceiling, 08 ``topk_per_head`` and CriticalAdaKV's two stages.

Random scores come in three kinds: all distinct, heads on different scales, and *tied* (a few values
only, so ties sit at every Top-K boundary). With ties any choice among the tied tokens is right;
the checkers then judge the learner's mask against the reference run on scores whose ties are broken
in favour of the learner's own choice (:func:`resolve_ties`), so a mask that keeps the wrong number
of tokens still fails.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from . import reference as ref
from ..budget import n_safe as safe_floor
from ..policies import adakv_keep_mask, projected_value_norm, topk_mask, topk_mask_per_head
from ._check import (WORKED, Case, Draw, Mistake, _tokens, compare_keep, compare_tensor, distinct_scores, exact,
                     has_ties, resolve_ties, run_checker, seeded, tied_scores, worked)
from .scoring import dtype_name

ALPHAS = [0.2, 0.2, 0.0, 0.1, 0.5, 1.0]
DTYPES = (torch.float32, torch.float32, torch.float16, torch.bfloat16)


def score_cases(draw: Draw, alphas=None, dtypes=DTYPES):
    """Random (b, n_kv, L) scores (distinct, heads on different scales, or tied), an n_kept, maybe an alpha."""
    b, n_kv, L = draw.int(1, 3), draw.int(1, 4), draw.int(1, 24)
    k = draw.int(1, L)
    kind = draw.pick(["distinct", "by_head", "tied"])
    dtype = draw.pick(dtypes)
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    if kind == "tied":
        scores = tied_scores(gen, b, n_kv, L)
    else:
        scores = distinct_scores(gen, b, n_kv, L, by_head=kind == "by_head")
    scores = scores.to(dtype)
    name = f"a random case b={b}, n_kv={n_kv}, L={L}, n_kept={k}"
    name += {"distinct": "", "by_head": ", heads on different scales", "tied": ", tied scores"}[kind]
    if dtype != torch.float32:
        name += f", {dtype_name(dtype)}"
    if alphas is None:
        return Case(f"{name} (seed {seed})", (scores, k), ties=kind == "tied")
    alpha = draw.pick(alphas)
    return Case(f"{name}, alpha_safeguard={alpha} (seed {seed})", (scores, k), {"alpha_safeguard": alpha},
                ties=kind == "tied")


def _worked_scores_case(**kwargs):
    _, _, scores = worked()
    return Case(WORKED + ", SnapKV scores", (scores, 50), kwargs)


def _is_mask_like(got, scores) -> bool:
    return isinstance(got, torch.Tensor) and got.shape == scores.shape and got.dtype == torch.bool


def _mask_expect(reference):
    """expect(case, got) for a keep-mask exercise: ties are broken the learner's way (see the module doc)."""

    def expect(case, got):
        scores, *rest = case.args
        if case.ties and _is_mask_like(got, scores):
            scores = resolve_ties(scores, got)
        return reference(scores, *rest, **case.kwargs)

    return expect


def _ge_threshold(scores, k):
    """Keep every score >= the k-th largest of its head (more than k when scores tie)."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores >= scores.topk(k, dim=-1).values[..., -1:]


GE_IDEA = ("with tied scores, 'score >= the k-th largest' keeps *more* than k tokens; a keep mask keeps exactly "
           "k per head, and any of the tied tokens may be the one left out")
GE_CODE = "scatter True at scores.topk(k, dim=-1).indices instead of comparing the scores with a threshold"

# -- 03 uniform Top-K -----------------------------------------------------------------------------

UNIFORM_MISTAKES = [
    Mistake(lambda s, k: topk_mask(-s, k), "Top-K keeps the *largest* scores (higher score = more important)",
            "scores.topk(n_kept, dim=-1) (largest=True is the default), or argsort(descending=True)"),
    Mistake(lambda s, k: topk_mask(s.flatten(1), s.shape[1] * k).reshape(s.shape),
            "uniform selection gives *each head* n_kept tokens; one Top-K over all heads of a row is AdaKV's "
            "global selection (exercise 05)", "topk along the last axis of the (b, n_kv, L) scores, no reshape"),
    Mistake(lambda s, k: topk_mask(s.flatten(), s.shape[0] * s.shape[1] * k).reshape(s.shape),
            "select per (row, head): batch rows never share a budget", "scores.topk(n_kept, dim=-1) on the 3-D tensor"),
    Mistake(_ge_threshold, GE_IDEA, GE_CODE),
    Mistake(lambda s, k: s > s.topk(k, dim=-1).values[..., -1:],
            "'score > the n_kept-th largest' leaves out the n_kept-th token itself",
            GE_CODE),
]


def check_uniform_topk(fn) -> None:
    """Exercise 03: ``fn(scores (b, n_kv, L), n_kept) -> (b, n_kv, L) bool``, each head keeps its top n_kept."""
    run_checker("uniform_keep_mask", fn, [_worked_scores_case()], score_cases, ref.uniform_keep_mask,
                lambda got, exp, case: compare_keep(got, exp), UNIFORM_MISTAKES,
                expect=_mask_expect(ref.uniform_keep_mask))


# -- 04 safeguard ---------------------------------------------------------------------------------


def _n_safe_variant(count, n_kept, alpha, L):
    """n_safe as the right formula ("floor") or as a learner might get it wrong."""
    return {"floor": max(1, int(alpha * n_kept)) if alpha > 0 else 0,
            "round": max(1, round(alpha * n_kept)) if alpha > 0 else 0,
            "ceil": max(1, math.ceil(alpha * n_kept)) if alpha > 0 else 0,
            "no_min": int(alpha * n_kept),
            "always_min": max(1, int(alpha * n_kept)),
            "of_L": max(1, int(alpha * L)) if alpha > 0 else 0,
            "n_kept": n_kept}[count]


def _safeguard_variant(count="floor", value="max", lowest=False, ties="topk"):
    def fn(scores, n_kept, alpha_safeguard=0.2):
        n = min(_n_safe_variant(count, n_kept, alpha_safeguard, scores.shape[-1]), scores.shape[-1])
        if ties == "threshold":
            protect = _ge_threshold(scores, n)
        else:
            protect = topk_mask(-scores if lowest else scores, n)
        if value == "max_plus_one":
            return scores.masked_fill(protect, 0) + protect * (scores.max() + 1)
        if value == "f32":  # out[protect] = float32's max: right in float32, inf in float16 / bfloat16
            return torch.where(protect, torch.tensor(torch.finfo(torch.float32).max).to(scores.dtype), scores)
        big = {"max": torch.finfo(scores.dtype).max, "inf": float("inf")}[value]
        return scores.masked_fill(protect, big)

    return fn


NSAFE_FLOOR = "n_safe = int(alpha_safeguard * n_kept), then max(1, n_safe) when alpha_safeguard > 0"
SAFE_COUNT_MISTAKES = [  # shared by exercises 04 and 05 (05 runs the safeguard first)
    ("round", "n_safe rounds *down*: floor(alpha * n_kept)", "int(alpha_safeguard * n_kept), not round(...)"),
    ("ceil", "n_safe rounds *down*: floor(alpha * n_kept)", "int(alpha_safeguard * n_kept), not math.ceil(...)"),
    ("no_min", "when alpha > 0 every head is promised at least one token: n_safe >= 1", NSAFE_FLOOR),
    ("always_min", "alpha_safeguard = 0 switches the safeguard off: n_safe = 0, no token is protected",
     "apply max(1, ...) only when alpha_safeguard > 0"),
    ("of_L", "n_safe is a fraction of the per-head *budget* n_kept, not of the context length L",
     "int(alpha_safeguard * n_kept), not int(alpha_safeguard * L)"),
]

SAFEGUARD_MISTAKES = [Mistake(_safeguard_variant(count=c), idea, code) for c, idea, code in SAFE_COUNT_MISTAKES] + [
    Mistake(_safeguard_variant(count="n_kept"), "the safeguard protects n_safe tokens per head, not n_kept",
            "idx = scores.topk(n_safe, dim=-1).indices"),
    Mistake(_safeguard_variant(value="inf"),
            "the protected score is the dtype's largest *finite* value: inf turns into nan in later "
            "arithmetic (inf * 0)", "torch.finfo(scores.dtype).max, not float('inf')"),
    Mistake(_safeguard_variant(value="f32"),
            "use the largest value of the scores' *own* dtype: float32's max overflows to inf in float16 and "
            "bfloat16", "torch.finfo(scores.dtype).max, not torch.finfo(torch.float32).max"),
    Mistake(_safeguard_variant(value="max_plus_one"),
            "the protected score is the dtype's largest finite value, so it outranks anything in any later "
            "selection (scores of other heads and rows included)",
            "torch.finfo(scores.dtype).max, not scores.max() + 1"),
    Mistake(_safeguard_variant(lowest=True), "protect each head's *highest* n_safe scores",
            "scores.topk(n_safe, dim=-1) (largest=True is the default)"),
    Mistake(_safeguard_variant(ties="threshold"), GE_IDEA.replace("k-th", "n_safe-th").replace("k per", "n_safe per"),
            GE_CODE.replace("topk(k", "topk(n_safe")),
]


def n_safe_story(n_kept: int, alpha: float) -> str:
    """n_safe for these arguments, with the arithmetic written out (exact: no 'floor(3) = 2')."""
    if alpha == 0:
        return "alpha_safeguard = 0 means no safeguard: n_safe = 0"
    product = alpha * n_kept
    floor = int(product)
    return (f"n_safe = max(1, floor({alpha} · {n_kept})) = max(1, floor({exact(product)})) = max(1, {floor}) "
            f"= {max(1, floor)}")


def _safeguard_expect(case, got):
    scores, k = case.args
    alpha = case.kwargs["alpha_safeguard"]
    if not (case.ties and isinstance(got, torch.Tensor) and got.shape == scores.shape and got.dtype == scores.dtype):
        return ref.safeguard(scores, k, alpha)
    big = torch.finfo(scores.dtype).max
    protected = ref.safeguard(resolve_ties(scores, got == big), k, alpha) == torch.finfo(torch.float64).max
    return scores.masked_fill(protected, big)


def _edge_scores(seed: int, b: int = 1, n_kv: int = 3, L: int = 12, dtype=torch.float32) -> torch.Tensor:
    return distinct_scores(seeded(seed), b, n_kv, L, by_head=True).to(dtype)


#: (n_kept, alpha) pairs on which the ways of getting n_safe wrong disagree (floor / round / ceil / no
#: minimum / minimum at alpha = 0 / a fraction of L / a fixed alpha of 0.2)
SAFE_EDGES = [(5, 0.5), (3, 0.2), (3, 0.0), (7, 0.2), (4, 0.4), (3, 0.5)]


def _safe_edge_cases(b: int = 1) -> list[Case]:
    """Scores whose heads live on different scales (the lowest head keeps exactly n_safe under AdaKV)."""
    return [Case(f"an edge case b={b}, n_kv=3, L=12, heads on different scales, n_kept={k}, alpha_safeguard={a}",
                 (_edge_scores(10 + i, b), k), {"alpha_safeguard": a}) for i, (k, a) in enumerate(SAFE_EDGES)]


def check_safeguard(fn) -> None:
    """Exercise 04: ``fn(scores (b, n_kv, L), n_kept, alpha_safeguard=0.2) -> protected scores (b, n_kv, L)``."""

    def compare(got, expected, case):
        problem = compare_tensor(got, expected, "protected scores", ("row", "head", "token"), 0, 0)
        if problem is None or got.shape != expected.shape or got.dtype != expected.dtype:
            return problem
        big = torch.finfo(expected.dtype).max
        n_got, n_exp = (got == big).sum(-1), (expected == big).sum(-1)  # (b, n_kv) protected per head
        if not torch.equal(n_got, n_exp):
            r, h = (n_got != n_exp).nonzero()[0].tolist()
            k = case.args[1]
            problem += (f"\n  row {r}, head {h} has {_tokens(int(n_got[r, h]))} at torch.finfo(dtype).max, expected "
                        f"{int(n_exp[r, h])}: {n_safe_story(k, case.kwargs['alpha_safeguard'])}")
        return problem

    edges = _safe_edge_cases(b=2) + [Case("an edge case in float16, n_kept=5, alpha_safeguard=0.2",
                                          (_edge_scores(3, 2, 2, 6, torch.float16), 5), {"alpha_safeguard": 0.2})]
    run_checker("safeguard", fn, [_worked_scores_case(alpha_safeguard=0.2)] + edges,
                partial(score_cases, alphas=ALPHAS),
                ref.safeguard, compare, SAFEGUARD_MISTAKES, tol={"atol": 0, "rtol": 0},
                error_hints={"overflow": ("the protected score must fit the scores' own dtype: float32's max "
                                          "does not fit in float16", "torch.finfo(scores.dtype).max")},
                expect=_safeguard_expect)


# -- 05 AdaKV global selection --------------------------------------------------------------------


def _adakv_variant(count="floor", flatten="heads", budget="row_all", ties="topk", alpha=None):
    def fn(scores, n_kept, alpha_safeguard=0.2):
        a = alpha_safeguard if alpha is None else alpha
        b, n_kv, L = scores.shape
        n = min(_n_safe_variant(count, n_kept, a, L), L)
        protected = scores.masked_fill(topk_mask(scores, n), torch.finfo(scores.dtype).max)
        flat = protected.transpose(1, 2).reshape(b, L * n_kv) if flatten == "tokens" else protected.reshape(b, -1)
        k = {"row_all": n_kv * n_kept, "row_one": n_kept}[budget]
        keep = _ge_threshold(flat, k) if ties == "threshold" else topk_mask(flat, k)
        return keep.reshape(b, n_kv, L)

    return fn


ADAKV_MISTAKES = [
    Mistake(_adakv_variant(alpha=0.0),
            "AdaKV without the safeguard: first give each head its top n_safe tokens (set them to the dtype's "
            "max), then select globally", "protected = safeguard(scores, n_kept, alpha_safeguard) before the "
                                          "global topk"),
    Mistake(_adakv_variant(alpha=0.2), "use the alpha_safeguard you are given, not a fixed 0.2",
            "safeguard(scores, n_kept, alpha_safeguard)"),
    Mistake(lambda s, k, alpha_safeguard=0.2: topk_mask(ref.safeguard(s, k, alpha_safeguard), k),
            "this is per-head (uniform) selection; AdaKV's selection is global: the heads of a row compete "
            "for one budget", "flat = protected.reshape(b, n_kv * L); flat.topk(n_kv * n_kept, dim=-1)"),
    Mistake(lambda s, k, alpha_safeguard=0.2: topk_mask(ref.safeguard(s, k, alpha_safeguard).flatten(),
                                                        s.shape[0] * s.shape[1] * k).reshape(s.shape),
            "AdaKV selects per batch row: each row keeps exactly n_kv * n_kept pairs, rows never trade budget",
            "reshape to (b, n_kv * L), not flatten(), and topk along the last axis"),
    Mistake(_adakv_variant(budget="row_one"),
            "a row's budget is n_kv · n_kept pairs: uniform selection would keep n_kept in each of the n_kv heads",
            "flat.topk(n_kv * n_kept, dim=-1)"),
    Mistake(_adakv_variant(flatten="tokens"),
            "flatten the heads side by side and undo it the same way; flattening (L, n_kv) and reshaping back "
            "to (n_kv, L) moves tokens between heads",
            "protected.reshape(b, n_kv * L) ... keep.reshape(b, n_kv, L), no transpose"),
    Mistake(_adakv_variant(ties="threshold"), GE_IDEA.replace("k per head", "n_kv · n_kept per row"),
            GE_CODE.replace("topk(k", "topk(n_kv * n_kept")),
] + [Mistake(_adakv_variant(count=c), idea, code) for c, idea, code in SAFE_COUNT_MISTAKES]


def check_adakv_selection(fn) -> None:
    """Exercise 05: ``fn(scores (b, n_kv, L), n_kept, alpha_safeguard=0.2) -> (b, n_kv, L) bool``."""
    run_checker("adakv_keep_mask", fn, [_worked_scores_case(alpha_safeguard=0.2)] + _safe_edge_cases(),
                partial(score_cases, alphas=ALPHAS),
                ref.adakv_keep_mask, lambda got, exp, case: compare_keep(got, exp), ADAKV_MISTAKES,
                expect=_mask_expect(ref.adakv_keep_mask))


# -- 06 floor and ceiling -------------------------------------------------------------------------


def _bounds_variant(kept="int", kept_min=True, count="floor", cap=True, ceiling="right"):
    def fn(L, cr, n_kv, alpha_safeguard=0.2):
        k = {"int": int(L * (1 - cr)), "round": round(L * (1 - cr)), "minus": L - int(L * cr)}[kept]
        k = max(1, k) if kept_min else k
        s = _n_safe_variant(count, k, alpha_safeguard, L)
        c = {"right": s + n_kv * (k - s), "all": n_kv * k, "no_own": n_kv * (k - s)}[ceiling]
        return s, (min(L, c) if cap else c)

    return fn


BOUNDS_MISTAKES = [
    Mistake(_bounds_variant(kept="round"),
            "n_kept floors: max(1, floor(L · (1 - cr))), computed with Python floats, so n_kept(90, 0.3) = 62 "
            "because 90 * 0.7 = 62.99999999999999", "max(1, int(L * (1 - compression_ratio))), not round(...)"),
    Mistake(_bounds_variant(kept="minus"),
            "n_kept = floor(L · (1 - cr)): compute the kept fraction first and floor it; L - floor(L · cr) "
            "rounds the other way", "max(1, int(L * (1 - compression_ratio)))"),
    Mistake(_bounds_variant(kept_min=False), "a head keeps at least one token: n_kept = max(1, ...)",
            "max(1, int(L * (1 - compression_ratio)))"),
] + [Mistake(_bounds_variant(count=c), idea, code) for c, idea, code in SAFE_COUNT_MISTAKES] + [
    Mistake(_bounds_variant(cap=False), "a head cannot keep more than the L tokens it has",
            "ceiling = min(L, n_safe + n_kv * (n_kept - n_safe))"),
    Mistake(_bounds_variant(ceiling="all"),
            "the other n_kv - 1 heads must keep n_safe each, so one head gets at most "
            "n_kv · n_kept - (n_kv - 1) · n_safe", "min(L, n_kv * n_kept - (n_kv - 1) * n_safe)"),
    Mistake(_bounds_variant(ceiling="no_own"),
            "you subtracted n_safe for every head, the head itself included: only the n_kv - 1 *other* heads "
            "sit at their floor", "n_kv * n_kept - (n_kv - 1) * n_safe = n_safe + n_kv * (n_kept - n_safe)"),
]


def bounds_cases(draw: Draw):
    L = draw.int(1, 4000)
    cr = draw.pick([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.95, 0.99])
    n_kv = draw.int(1, 32)
    alpha = draw.pick(ALPHAS)
    return Case(f"L={L}, compression_ratio={cr}, n_kv={n_kv}, alpha_safeguard={alpha}", (L, cr, n_kv),
                {"alpha_safeguard": alpha})


def bounds_story(L: int, cr: float, n_kv: int, alpha: float) -> str:
    """The right floor and ceiling for these arguments, every step written out with exact arithmetic."""
    product = L * (1 - cr)
    k = max(1, int(product))
    s = safe_floor(k, alpha)
    c = s + n_kv * (k - s)
    return (f"n_kept = max(1, floor({L} · (1 - {cr}))) = max(1, floor({exact(product)})) = max(1, {int(product)}) "
            f"= {k}\n"
            f"  {n_safe_story(k, alpha)}  (the floor)\n"
            f"  ceiling = min(L, n_safe + n_kv · (n_kept - n_safe)) = min({L}, {s} + {n_kv} · {k - s}) "
            f"= min({L}, {c}) = {min(L, c)}")


def _compare_bounds(got, expected, case):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a pair (floor, ceiling), got {got!r}"
    try:
        got = tuple(int(v) for v in got)
    except (TypeError, ValueError):
        return f"floor and ceiling must be integers, got {got!r}"
    if got == tuple(expected):
        return None
    diff = "; ".join(f"{name}: expected {e}, got {g}" for name, e, g in zip(("floor", "ceiling"), expected, got)
                     if e != g)
    return diff + "\n  " + bounds_story(*case.args, case.kwargs["alpha_safeguard"])


def check_floor_ceiling(fn) -> None:
    """Exercise 06: ``fn(L, compression_ratio, n_kv, alpha_safeguard=0.2) -> (floor, ceiling)``."""
    worked_cases = [Case(WORKED, (100, 0.5, 4), {"alpha_safeguard": 0.2}),
                    Case("L=90, cr=0.3, n_kv=4, alpha=1.0 (a float trap)", (90, 0.3, 4), {"alpha_safeguard": 1.0}),
                    Case("L=100, cr=0.9, n_kv=4, alpha=0.2", (100, 0.9, 4), {"alpha_safeguard": 0.2}),
                    Case("L=10, cr=0.3, n_kv=4, alpha=0.2 (n_kept = 7, alpha * n_kept = 1.4)", (10, 0.3, 4),
                         {"alpha_safeguard": 0.2}),
                    Case("L=10, cr=0.5, n_kv=3, alpha=0.5 (alpha * n_kept = 2.5)", (10, 0.5, 3),
                         {"alpha_safeguard": 0.5}),
                    Case("L=12, cr=0.75, n_kv=2, alpha=0.0 (no safeguard)", (12, 0.75, 2), {"alpha_safeguard": 0.0}),
                    Case("L=1, cr=0.5, n_kv=2, alpha=0.2 (one token)", (1, 0.5, 2), {"alpha_safeguard": 0.2})]
    run_checker("floor_ceiling", fn, worked_cases, bounds_cases, ref.floor_ceiling, _compare_bounds,
                BOUNDS_MISTAKES, n_random=200)


# -- 08a topk_per_head ----------------------------------------------------------------------------


def _per_head_variant(kind):
    def fn(scores, budgets):
        if kind == "argsort_once":
            return scores.argsort(dim=-1, descending=True, stable=True) < budgets[..., None]
        if kind == "lowest":
            return topk_mask_per_head(-scores, budgets)
        if kind == "one_k":
            return topk_mask(scores, int(budgets.max()))
        if kind == "plus_one":
            return topk_mask_per_head(scores, budgets + 1)
        rank_of_kth = scores.sort(dim=-1, descending=True).values  # (b, n_kv, L)
        kth = rank_of_kth.gather(-1, (budgets[..., None] - 1).clamp(min=0))
        return (scores >= kth) & (budgets[..., None] > 0)  # "threshold"

    return fn


PER_HEAD_MISTAKES = [
    Mistake(_per_head_variant("argsort_once"),
            "argsort gives, for each rank, *which token* holds it; you need the opposite, each token's rank",
            "rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1); keep = rank < budgets[..., None]"),
    Mistake(_per_head_variant("lowest"), "keep each head's *largest* scores", "argsort(..., descending=True)"),
    Mistake(_per_head_variant("one_k"), "every (row, head) has its own K = budgets[r, h], not one K for all",
            "compare each token's rank with budgets[..., None] (shape (b, n_kv, 1))"),
    Mistake(_per_head_variant("plus_one"),
            "rank 0 is the best token, so a head with budget B keeps ranks 0 .. B - 1",
            "rank < budgets[..., None], not <="),
    Mistake(_per_head_variant("threshold"), GE_IDEA.replace("k-th", "B-th").replace("k per head", "B per head"),
            "rank the tokens (argsort of argsort) and keep rank < budgets[..., None]; a score threshold "
            "cannot split a tie"),
]


def per_head_cases(draw: Draw):
    b, n_kv, L = draw.int(1, 3), draw.int(1, 4), draw.int(1, 16)
    kind = draw.pick(["distinct", "by_head", "tied"])
    dtype = draw.pick(DTYPES)
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    scores = (tied_scores(gen, b, n_kv, L) if kind == "tied"
              else distinct_scores(gen, b, n_kv, L, by_head=kind == "by_head")).to(dtype)
    budgets = torch.randint(0, L + 1, (b, n_kv), generator=gen)
    name = (f"a random case b={b}, n_kv={n_kv}, L={L}, budgets={budgets.tolist()}"
            + {"distinct": "", "by_head": ", heads on different scales", "tied": ", tied scores"}[kind]
            + ("" if dtype == torch.float32 else f", {dtype_name(dtype)}"))
    return Case(f"{name} (seed {seed})", (scores, budgets), ties=kind == "tied")


def check_topk_per_head(fn) -> None:
    """Exercise 08, helper: ``fn(scores (b, n_kv, L), budgets (b, n_kv)) -> (b, n_kv, L) bool``."""
    _, _, scores = worked()
    budgets = adakv_keep_mask(scores, 50, 0.2).sum(-1)  # (1, n_kv): AdaKV's budgets, different per head
    case = Case(WORKED + ", SnapKV scores, AdaKV's budgets " + str(budgets.tolist()), (scores, budgets))
    run_checker("topk_per_head", fn, [case], per_head_cases, topk_mask_per_head,
                lambda got, exp, case: compare_keep(got, exp), PER_HEAD_MISTAKES,
                expect=_mask_expect(topk_mask_per_head))


# -- 08b CriticalAdaKV ----------------------------------------------------------------------------


def _critical_variant(budgets="adakv", stage1="max", stage2="critical", eps="inside",
                      overlap=False, budget_alpha=None, **fixed):
    def fn(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5):
        args = {"alpha_safeguard": alpha_safeguard, "epsilon": epsilon, "first_stage_ratio": first_stage_ratio}
        args.update(fixed)  # a learner who ignores an argument uses its default
        alpha, ratio = args["alpha_safeguard"], args["first_stage_ratio"]
        b, n_kv = scores.shape[:2]
        if budgets == "uniform":
            B = torch.full((b, n_kv), n_kept)
        else:
            B = adakv_keep_mask(scores, n_kept, alpha if budget_alpha is None else budget_alpha).sum(-1)  # (b, n_kv)
            if budgets == "batch":  # kvpress: summed over the batch rows
                B = B.sum(0, keepdim=True).expand(b, n_kv)
        n_safe = safe_floor(n_kept, alpha)
        first = (B * ratio).round().long() if stage1 == "round" else (B * ratio).long()  # (b, n_kv)
        first = {"max": first.clamp(min=n_safe), "round": first.clamp(min=n_safe), "plain": first,
                 "none": first * 0}[stage1]
        n = projected_value_norm(values, o_proj)
        crit = {"inside": (scores.float() + args["epsilon"]) * n, "none": scores.float() * n}[eps]
        if stage2 == "adakv":
            return adakv_keep_mask(scores, n_kept, alpha)
        protected = topk_mask_per_head(scores.float(), first)
        if overlap:
            return protected | topk_mask_per_head(crit, (B - first).clamp(min=0))
        return topk_mask_per_head(crit.masked_fill(protected, torch.finfo(crit.dtype).max), B)

    return fn


def _ignored(arg, default):
    return (f"your answer is what the right function gives with {arg}={default}: the {arg} you are given is "
            f"ignored somewhere", f"pass {arg} through (no fixed {default} inside the function)")


CRITICAL_MISTAKES = [
    Mistake(_critical_variant(budgets="uniform"),
            "these are uniform budgets (CriticalKV); CriticalAdaKV takes each head's budget B from AdaKV's global "
            "selection on the base scores", "budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(dim=-1)"),
    Mistake(_critical_variant(budgets="batch"),
            "budgets are per batch row: B[r, h] counts what head h keeps in row r (kvpress sums them over the "
            "batch, which is only right for one row)",
            "adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(dim=-1) -> (b, n_kv); not .sum(dim=(0, 2))"),
    Mistake(_critical_variant(stage1="none"),
            "stage 1 is missing (or ranks by the stage-2 score, which comes to the same): first protect each "
            "head's top max(n_safe, floor(B · first_stage_ratio)) tokens by the *base* score alone",
            "protected = topk_per_head(scores.float(), first), then force them to the top of the stage-2 score"),
    Mistake(_critical_variant(stage1="plain"),
            "stage 1 protects max(n_safe, floor(B · first_stage_ratio)) tokens: the safeguarded n_safe stay "
            "protected even when B · ratio is smaller",
            "first = (budgets * first_stage_ratio).long().clamp(min=n_safe)"),
    Mistake(_critical_variant(stage1="round"), "the stage-1 size rounds *down*: floor(B · first_stage_ratio)",
            "(budgets * first_stage_ratio).long(), not .round()"),
    Mistake(_critical_variant(stage2="adakv"),
            "this is plain AdaKV: stage 2 fills the rest of each head's budget by (score + ε) · N, "
            "N = ||v · W_o||_1", "crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)"),
    Mistake(_critical_variant(eps="none"),
            "the stage-2 score is (score + ε) · N, ε added *before* multiplying: ε · N lets a token with ~zero "
            "attention but a large value norm compete (score · N, or score · N + ε, ranks as if ε were 0)",
            "(scores.float() + epsilon) * N"),
    Mistake(_critical_variant(overlap=True),
            "stage 2 fills the *rest* of the budget: it ranks the tokens stage 1 did not take, so the head ends "
            "with exactly B tokens", "crit.masked_fill(protected, torch.finfo(crit.dtype).max), then "
                                     "topk_per_head(crit, budgets)"),
    Mistake(_critical_variant(epsilon=1e-4), *_ignored("epsilon", 1e-4)),
    Mistake(_critical_variant(first_stage_ratio=0.5), *_ignored("first_stage_ratio", 0.5)),
    Mistake(_critical_variant(alpha_safeguard=0.2), *_ignored("alpha_safeguard", 0.2)),
    Mistake(_critical_variant(budget_alpha=0.2),
            "the budgets come from AdaKV run with *your* alpha_safeguard; adakv_keep_mask's default of 0.2 "
            "is not it", "adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(dim=-1)"),
]


def critical_cases(draw: Draw):
    b, n_kv, g = draw.int(1, 3), draw.int(1, 4), draw.int(1, 2)
    L, d = draw.int(2, 24), draw.pick([2, 4])
    k = draw.int(1, L)
    alpha = draw.pick([0.2, 0.2, 0.0, 0.5, 1.0])
    eps = draw.pick([1e-4, 1e-4, 0.0, 1e-2, 1.0])
    ratio = draw.pick([0.5, 0.5, 0.25, 1.0, 0.0])
    dtype = draw.pick([torch.float32, torch.float32, torch.bfloat16])
    seed = draw.int(0, 2**20)
    gen = seeded(seed)
    # distinct scores spread over many orders of magnitude (some far below epsilon), like attention
    raw = distinct_scores(gen, b, n_kv, L, draw.pick([False, True]))
    scores = torch.exp(-16 * raw / raw.amax(dim=(1, 2), keepdim=True).clamp(min=1e-9))  # (b, n_kv, L) in [1e-7, 1]
    values = torch.randn(b, n_kv, L, d, generator=gen) * torch.rand(b, n_kv, L, 1, generator=gen) * 2
    o_proj = torch.randn(3 * d, n_kv * g * d, generator=gen)
    if has_ties(scores.to(dtype)):  # (consecutive scores differ by >= 15 %, so bfloat16 keeps them apart)
        dtype = torch.float32
    scores, values, o_proj = scores.to(dtype), values.to(dtype), o_proj.to(dtype)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L={L}, d={d}, n_kept={k}, alpha_safeguard={alpha}, "
                f"epsilon={eps}, first_stage_ratio={ratio}"
                + ("" if dtype == torch.float32 else f", {dtype_name(dtype)}")
                + f" (seed {seed})", (scores, values, o_proj, k),
                {"alpha_safeguard": alpha, "epsilon": eps, "first_stage_ratio": ratio})


def _critical_edge_cases() -> list[Case]:
    """One head, four tokens, n_kept = 3 (B = 3): stage 1 protects floor(1.5) = 1 token, and the stage-2
    score ranks the base score's second token last -- so the size of stage 1 decides whether it stays."""
    scores = torch.tensor([[[0.9, 0.8, 0.01, 0.001]]])  # (1, 1, 4)
    values = torch.tensor([[[[1.0, 0.0], [0.001, 0.0], [100.0, 0.0], [100.0, 0.0]]]])  # (1, 1, 4, 2)
    o_proj = torch.eye(2)  # N = ||v||_1
    tiny = Case("an edge case: one head, n_kept=3, first_stage_ratio=0.5 (stage 1 keeps floor(1.5) = 1 token)",
                (scores, values, o_proj, 3), {"alpha_safeguard": 0.2, "epsilon": 1e-4, "first_stage_ratio": 0.5})
    # epsilon decides: token 1 has almost no attention but a 10x larger value norm than token 2
    eps_scores = torch.tensor([[[0.5, 1e-6, 1e-4]]])  # (1, 1, 3)
    eps_values = torch.tensor([[[[1.0, 0.0], [10.0, 0.0], [1.0, 0.0]]]])  # (1, 1, 3, 2)
    eps_cases = [Case(f"an edge case: one head, n_kept=2, epsilon={e} (with epsilon = 1e-4 token 1 wins the "
                      f"last place, with epsilon = 0 token 2)", (eps_scores, eps_values, o_proj, 2),
                      {"alpha_safeguard": 0.2, "epsilon": e, "first_stage_ratio": 0.5}) for e in (1e-4, 0.0)]
    x, _, worked_scores = worked()
    two_rows = Case("an edge case: the worked example twice, the second row with its heads' scores reversed, "
                    "alpha_safeguard=0.5, epsilon=0.01, first_stage_ratio=0.25",
                    (torch.cat([worked_scores, worked_scores.flip(1)]), x.values.expand(2, -1, -1, -1), x.o_proj, 50),
                    {"alpha_safeguard": 0.5, "epsilon": 0.01, "first_stage_ratio": 0.25})
    return [tiny, *eps_cases, two_rows]


def check_critical_adakv(fn) -> None:
    """Exercise 08: ``fn(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
    first_stage_ratio=0.5) -> (b, n_kv, L) bool``."""
    x, _, scores = worked()
    case = Case(WORKED + ", SnapKV scores", (scores, x.values, x.o_proj, 50),
                {"alpha_safeguard": 0.2, "epsilon": 1e-4, "first_stage_ratio": 0.5})

    def compare(got, expected, case):
        problem = compare_keep(got, expected)
        if problem and "keeps" in problem:
            problem += "\n  (the expected counts are AdaKV's budgets B of each head, per batch row)"
        return problem

    run_checker("critical_adakv_keep_mask", fn, [case] + _critical_edge_cases(), critical_cases,
                ref.critical_adakv_keep_mask,
                compare, CRITICAL_MISTAKES)

