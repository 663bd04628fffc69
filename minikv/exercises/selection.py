"""Checkers for the selection exercises: 03 uniform Top-K, 04 safeguard, 05 AdaKV global selection,
06 a head's floor and ceiling, 08 CriticalAdaKV's two stages."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from . import reference as ref
from ..budget import n_safe as safe_floor
from ..policies import adakv_keep_mask, projected_value_norm, topk_mask, topk_mask_per_head
from ._check import WORKED, Case, Mistake, compare_keep, compare_tensor, distinct_scores, run_checker, seeded, worked

ALPHAS = st.sampled_from([0.2, 0.2, 0.0, 0.1, 0.5, 1.0])


@st.composite
def score_cases(draw, alphas=None, dtypes=(torch.float32,)):
    """Random (b, n_kv, L) scores without ties, an n_kept, and optionally an alpha and a dtype."""
    b, n_kv, L = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 24))
    k = draw(st.integers(1, L))
    by_head = draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**20))
    scores = distinct_scores(seeded(seed), b, n_kv, L, by_head).to(dtype)
    name = f"a random case b={b}, n_kv={n_kv}, L={L}, n_kept={k}"
    if by_head:
        name += ", heads on different scales"
    if dtype != torch.float32:
        name += f", {str(dtype).replace('torch.', '')}"
    if alphas is None:
        return Case(f"{name} (seed {seed})", (scores, k))
    alpha = draw(alphas)
    return Case(f"{name}, alpha_safeguard={alpha} (seed {seed})", (scores, k), {"alpha_safeguard": alpha})


def _worked_scores_case(**kwargs):
    _, _, scores = worked()
    return Case(WORKED + ", SnapKV scores", (scores, 50), kwargs)


# -- 03 uniform Top-K -----------------------------------------------------------------------------

UNIFORM_MISTAKES = [
    Mistake(lambda s, k: topk_mask(-s, k), "you kept the *lowest* scores: Top-K keeps the largest (topk's default)"),
    Mistake(lambda s, k: topk_mask(s.flatten(1), s.shape[1] * k).reshape(s.shape),
            "looks like one Top-K over all heads of a row (that is AdaKV's global selection); uniform "
            "selection keeps n_kept tokens in *each* head"),
    Mistake(lambda s, k: topk_mask(s.flatten(), s.shape[0] * s.shape[1] * k).reshape(s.shape),
            "looks like one Top-K over the whole batch; select per (row, head)"),
]


def check_uniform_topk(fn) -> None:
    """Exercise 03: ``fn(scores (b, n_kv, L), n_kept) -> (b, n_kv, L) bool``, each head keeps its top n_kept."""
    run_checker("uniform_keep_mask", fn, [_worked_scores_case()], score_cases(), ref.uniform_keep_mask,
                lambda got, exp, case: compare_keep(got, exp), UNIFORM_MISTAKES)


# -- 04 safeguard ---------------------------------------------------------------------------------


def _safeguard_variant(count="floor", value="max", lowest=False):
    def fn(scores, n_kept, alpha_safeguard=0.2):
        n = {"floor": max(1, int(alpha_safeguard * n_kept)) if alpha_safeguard > 0 else 0,
             "round": max(1, round(alpha_safeguard * n_kept)) if alpha_safeguard > 0 else 0,
             "no_min": int(alpha_safeguard * n_kept), "n_kept": n_kept}[count]
        big = {"max": torch.finfo(scores.dtype).max, "inf": float("inf"),
               "f32": torch.finfo(torch.float32).max}[value]
        top = (-scores if lowest else scores).topk(n, dim=-1).indices
        return scores.scatter(-1, top, big)

    return fn


SAFEGUARD_MISTAKES = [
    Mistake(_safeguard_variant(count="round"), "n_safe = floor(alpha * n_kept) (int(), not round())"),
    Mistake(_safeguard_variant(count="no_min"), "when alpha > 0, n_safe is at least 1: max(1, floor(alpha * n_kept))"),
    Mistake(_safeguard_variant(count="n_kept"), "you protected n_kept tokens per head; protect only n_safe"),
    Mistake(_safeguard_variant(value="inf"), "use the dtype's largest finite value, torch.finfo(scores.dtype).max, "
            "not inf (inf * 0 = nan in later arithmetic)"),
    Mistake(_safeguard_variant(lowest=True), "you protected the *lowest* scores; protect each head's top n_safe"),
]


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
            s, k = case.args
            problem += (f"\n  row {r}, head {h} has {int(n_got[r, h])} tokens at torch.finfo(dtype).max; n_safe = "
                        f"max(1, floor({case.kwargs['alpha_safeguard']} * {k})) = {int(n_exp[r, h])}")
        return problem

    run_checker("safeguard", fn, [_worked_scores_case(alpha_safeguard=0.2)],
                score_cases(ALPHAS, (torch.float32, torch.float32, torch.float16, torch.bfloat16)),
                ref.safeguard, compare, SAFEGUARD_MISTAKES, tol={"atol": 0, "rtol": 0},
                error_hints={"overflow": "use the largest value of the scores' own dtype, torch.finfo(scores.dtype).max: "
                             "float32's max does not fit in float16"})


# -- 05 AdaKV global selection --------------------------------------------------------------------

ADAKV_MISTAKES = [
    Mistake(lambda s, k, alpha_safeguard=0.2: adakv_keep_mask(s, k, 0.0),
            "looks like AdaKV without the safeguard: first give each head its top n_safe tokens "
            "(set them to the dtype's max), then select globally"),
    Mistake(lambda s, k, alpha_safeguard=0.2: topk_mask(s, k),
            "looks like per-head (uniform) selection instead of global selection: flatten the heads of a "
            "row to (b, n_kv * L) and keep its n_kv * n_kept largest"),
    Mistake(lambda s, k, alpha_safeguard=0.2: topk_mask(ref.safeguard(s, k, alpha_safeguard).flatten(),
                                                        s.shape[0] * s.shape[1] * k).reshape(s.shape),
            "looks like one selection over the whole batch; AdaKV selects per batch row "
            "(each row keeps exactly n_kv * n_kept)"),
]


def check_adakv_selection(fn) -> None:
    """Exercise 05: ``fn(scores (b, n_kv, L), n_kept, alpha_safeguard=0.2) -> (b, n_kv, L) bool``."""
    run_checker("adakv_keep_mask", fn, [_worked_scores_case(alpha_safeguard=0.2)], score_cases(ALPHAS),
                ref.adakv_keep_mask, lambda got, exp, case: compare_keep(got, exp), ADAKV_MISTAKES)


# -- 06 floor and ceiling -------------------------------------------------------------------------


def _bounds_variant(kept="int", safe_min=True, cap=True, ceiling="right"):
    def fn(L, cr, n_kv, alpha_safeguard=0.2):
        k = max(1, int(L * (1 - cr)) if kept == "int" else round(L * (1 - cr)))
        s = int(k * alpha_safeguard)
        s = max(1, s) if safe_min and alpha_safeguard > 0 else s
        c = {"right": s + n_kv * (k - s), "all": n_kv * k, "no_own": n_kv * (k - s)}[ceiling]
        return s, (min(L, c) if cap else c)

    return fn


BOUNDS_MISTAKES = [
    Mistake(_bounds_variant(kept="round"), "n_kept = max(1, int(L * (1 - cr))) with Python floats: it floors "
            "(n_kept(90, 0.3) = 62, because 90 * 0.7 = 62.99999999999999)"),
    Mistake(_bounds_variant(safe_min=False), "when alpha > 0 the floor n_safe is at least 1"),
    Mistake(_bounds_variant(cap=False), "a head cannot keep more than the L tokens it has: take min(L, ...)"),
    Mistake(_bounds_variant(ceiling="all"), "the other n_kv - 1 heads must keep n_safe each, so one head gets at "
            "most n_kv * n_kept - (n_kv - 1) * n_safe"),
    Mistake(_bounds_variant(ceiling="no_own"), "you subtracted n_safe for every head, including the head itself: "
            "n_kv * n_kept - (n_kv - 1) * n_safe = n_safe + n_kv * (n_kept - n_safe)"),
]


@st.composite
def bounds_cases(draw):
    L = draw(st.integers(1, 4000))
    cr = draw(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 0.95, 0.99]))
    n_kv = draw(st.integers(1, 32))
    alpha = draw(ALPHAS)
    return Case(f"L={L}, compression_ratio={cr}, n_kv={n_kv}, alpha_safeguard={alpha}", (L, cr, n_kv),
                {"alpha_safeguard": alpha})


def _compare_bounds(got, expected, case):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"expected a pair (floor, ceiling), got {got!r}"
    try:
        got = tuple(int(v) for v in got)
    except (TypeError, ValueError):
        return f"floor and ceiling must be integers, got {got!r}"
    if got == tuple(expected):
        return None
    return "; ".join(f"{name}: expected {e}, got {g}" for name, e, g in zip(("floor", "ceiling"), expected, got) if e != g)


def check_floor_ceiling(fn) -> None:
    """Exercise 06: ``fn(L, compression_ratio, n_kv, alpha_safeguard=0.2) -> (floor, ceiling)``."""
    worked_cases = [Case(WORKED, (100, 0.5, 4), {"alpha_safeguard": 0.2}),
                    Case("L=90, cr=0.3, n_kv=4, alpha=1.0 (a float trap)", (90, 0.3, 4), {"alpha_safeguard": 1.0}),
                    Case("L=100, cr=0.9, n_kv=4, alpha=0.2", (100, 0.9, 4), {"alpha_safeguard": 0.2})]
    run_checker("floor_ceiling", fn, worked_cases, bounds_cases(), ref.floor_ceiling, _compare_bounds,
                BOUNDS_MISTAKES, n_random=200)


# -- 08 CriticalAdaKV -----------------------------------------------------------------------------


def _critical_variant(budgets="adakv", stage1="max", stage2="critical", eps=True):
    def fn(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5):
        if budgets == "adakv":
            B = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)  # (b, n_kv)
        else:
            B = torch.full(scores.shape[:2], n_kept)
        n_safe = safe_floor(n_kept, alpha_safeguard)
        first = (B * first_stage_ratio).long()
        first = {"max": first.clamp(min=n_safe), "plain": first, "none": first * 0}[stage1]
        n = projected_value_norm(values, o_proj)
        crit = (scores.float() + (epsilon if eps else 0.0)) * n
        if stage2 == "adakv":
            return adakv_keep_mask(scores, n_kept, alpha_safeguard)
        protected = topk_mask_per_head(scores.float(), first)
        return topk_mask_per_head(crit.masked_fill(protected, torch.finfo(crit.dtype).max), B)

    return fn


CRITICAL_MISTAKES = [
    Mistake(_critical_variant(budgets="uniform"), "looks like uniform budgets (CriticalKV); CriticalAdaKV takes "
            "each head's budget B from AdaKV's global selection on the base scores"),
    Mistake(_critical_variant(stage1="none"), "stage 1 is missing: first protect each head's top "
            "max(n_safe, floor(B * first_stage_ratio)) tokens by the base score"),
    Mistake(_critical_variant(stage1="plain"), "stage 1 protects max(n_safe, floor(B * first_stage_ratio)) tokens: "
            "the safeguarded n_safe stay protected even when B * ratio is smaller"),
    Mistake(_critical_variant(stage2="adakv"), "looks like plain AdaKV: stage 2 fills the rest of each head's "
            "budget by (score + eps) * ||v W_o||_1"),
    Mistake(_critical_variant(eps=False), "the stage-2 score is (score + epsilon) * N: the epsilon lets tokens "
            "with ~zero attention but a large value norm compete"),
]


@st.composite
def critical_cases(draw):
    b, n_kv, g = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 2))
    L, d = draw(st.integers(2, 24)), draw(st.sampled_from([2, 4]))
    k = draw(st.integers(1, L))
    alpha = draw(st.sampled_from([0.2, 0.2, 0.5]))
    ratio = draw(st.sampled_from([0.5, 0.5, 0.25, 1.0]))
    seed = draw(st.integers(0, 2**20))
    gen = seeded(seed)
    # distinct scores spread over many orders of magnitude (some far below epsilon), like attention
    raw = distinct_scores(gen, b, n_kv, L, draw(st.booleans()))
    scores = torch.exp(-16 * raw / raw.amax(dim=(1, 2), keepdim=True))  # (b, n_kv, L) in [1e-7, 1]
    values = torch.randn(b, n_kv, L, d, generator=gen) * torch.rand(b, n_kv, L, 1, generator=gen) * 2
    o_proj = torch.randn(3 * d, n_kv * g * d, generator=gen)
    return Case(f"a random case b={b}, n_kv={n_kv}, g={g}, L={L}, d={d}, n_kept={k}, alpha_safeguard={alpha}, "
                f"first_stage_ratio={ratio} (seed {seed})", (scores, values, o_proj, k),
                {"alpha_safeguard": alpha, "first_stage_ratio": ratio})


def check_critical_adakv(fn) -> None:
    """Exercise 08: ``fn(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
    first_stage_ratio=0.5) -> (b, n_kv, L) bool``."""
    x, _, scores = worked()
    case = Case(WORKED + ", SnapKV scores", (scores, x.values, x.o_proj, 50),
                {"alpha_safeguard": 0.2, "first_stage_ratio": 0.5})

    def compare(got, expected, case):
        problem = compare_keep(got, expected)
        if problem and "keeps" in problem:
            problem += "\n  (the expected counts are AdaKV's per-row budgets B of each head)"
        return problem

    run_checker("critical_adakv_keep_mask", fn, [case], critical_cases(), ref.critical_adakv_keep_mask,
                compare, CRITICAL_MISTAKES)
