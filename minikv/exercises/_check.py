"""The machinery every checker shares: run the learner's function, compare, explain.

A checker runs the learner's function on

1. the user's worked example (4 KV heads, 100 tokens, ``minikv.demo.worked_example()``), then
2. random small cases drawn by hypothesis (derandomized, so a run repeats exactly),

compares every result with minikv's reference implementation, and on the first difference
raises :class:`ExerciseFailure` saying *what* differs (shape, dtype, which row / head / token,
expected vs got) and, when the wrong answer equals a known mistake, what that mistake is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st


class ExerciseFailure(AssertionError):
    """The learner's function gave a wrong answer; the message says where and, if it can, why."""


ExerciseFailure.__module__ = "minikv.exercises"  # how tracebacks name it


@dataclass
class Case:
    """One input of a checker: a description for messages, the arguments, and the reference answer."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __repr__(self) -> str:  # hypothesis prints this in its "Falsifying example" note
        return f"Case({self.name})"


@dataclass
class Mistake:
    """A plausible wrong implementation and the hint to give when the learner's answer equals it."""

    fn: Callable
    hint: str


def call(fn: Callable, case: Case, error_hints: dict[str, str] | None = None) -> Any:
    """Run the learner's function; NotImplementedError passes through untouched (the notebook guard prints it).

    error_hints maps a piece of an error message to a hint about its usual cause.
    """
    try:
        return fn(*clone(case.args), **case.kwargs)
    except NotImplementedError:
        raise
    except ExerciseFailure:
        raise
    except Exception as e:  # any other crash becomes an explained failure
        hints = "".join(f"\n  hint: {h}" for key, h in (error_hints or {}).items() if key in str(e))
        raise ExerciseFailure(f"on {case.name}: your function raised {type(e).__name__}: {e}\n"
                              f"  inputs: {describe(case.args)}{hints}") from e


def clone(x):
    """Deep copy of tensors in nested tuples/lists, so a learner who edits inputs in place cannot spoil the check."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def describe(args) -> str:
    """Short description of arguments: tensors by shape and dtype, the rest by value."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(f"tensor{tuple(a.shape)} {str(a.dtype).replace('torch.', '')}")
        elif isinstance(a, list):
            out.append(f"list of {len(a)}")
        else:
            out.append(repr(a))
    return ", ".join(out)


def same(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """True when two results agree (tensors: same shape and close values; tuples: element-wise)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y, atol, rtol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if a.dtype == torch.bool or b.dtype == torch.bool:
            return bool((a.bool() == b.bool()).all())
        return bool(torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True))
    return a == b


def diagnose(got, case: Case, mistakes: list[Mistake], **tol) -> str:
    """The hints of every known mistake whose output on this case equals the learner's."""
    hints = []
    for m in mistakes:
        try:
            wrong = m.fn(*clone(case.args), **case.kwargs)
        except Exception:  # a mistake that cannot even run here explains nothing
            continue
        if same(got, wrong, **tol):
            hints.append(m.hint)
    return "".join(f"\n  hint: {h}" for h in hints)


def show_small(case: Case, limit: int = 24) -> str:
    """The inputs themselves, when they are small enough to read (hypothesis shrinks failures to such cases)."""
    tensors = [a for a in case.args if isinstance(a, torch.Tensor)]
    if not tensors or any(t.numel() > limit for t in tensors):
        return ""
    shown = [repr(a).replace("\n", "\n    ") for a in case.args] + [f"{k}={v!r}" for k, v in case.kwargs.items()]
    return "\n  your function was called with:\n    " + ",\n    ".join(shown)


def fmt(x) -> str:
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        x = x.item()
    if isinstance(x, float):
        return f"{x:.6g}"
    return repr(x)


def compare_tensor(got, expected: torch.Tensor, what: str, axes: tuple[str, ...], atol: float = 1e-5,
                   rtol: float = 1e-4, shape_hints: dict | None = None) -> str | None:
    """None when ``got`` matches ``expected``; else a precise explanation of the first problem.

    axes names the dimensions for messages, e.g. ("row", "head", "token").
    shape_hints maps a wrong shape (tuple) to an explanation of how one gets it.
    """
    if not isinstance(got, torch.Tensor):
        return f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
    if got.shape != expected.shape:
        msg = (f"{what}: wrong shape: expected ({', '.join(axes)}) = {tuple(expected.shape)}, "
               f"got {tuple(got.shape)}")
        hint = (shape_hints or {}).get(tuple(got.shape))
        return msg + (f"\n  hint: {hint}" if hint else "")
    if got.dtype != expected.dtype:
        return f"{what}: wrong dtype: expected {expected.dtype}, got {got.dtype}"
    if expected.dtype == torch.bool:
        bad = got != expected
    else:
        bad = ~torch.isclose(got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True)
    if not bad.any():
        return None
    first = tuple(bad.nonzero()[0].tolist())
    where = ", ".join(f"{a} {i}" for a, i in zip(axes, first))
    return (f"{what}: {int(bad.sum())} of {bad.numel()} entries differ; first at {where}: "
            f"expected {fmt(expected[first])}, got {fmt(got[first])}")


def compare_keep(got, expected: torch.Tensor, what: str = "keep mask") -> str | None:
    """Compare (b, n_kv, L) bool keep masks, reporting per-head counts before single tokens."""
    problem = compare_tensor(got, expected, what, ("row", "head", "token"))
    if problem is None or not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != torch.bool:
        if problem and isinstance(got, torch.Tensor) and not got.dtype.is_floating_point and got.dtype != torch.bool:
            problem += ("\n  hint: a keep mask is a bool tensor of the scores' shape (True = kept); if you have the "
                        "indices of the kept tokens, scatter True into torch.zeros_like(scores, dtype=torch.bool)")
        return problem
    got_counts, exp_counts = got.sum(-1), expected.sum(-1)  # (b, n_kv)
    if not torch.equal(got_counts, exp_counts):
        r, h = (got_counts != exp_counts).nonzero()[0].tolist()
        return (f"{what}: row {r}, head {h} keeps {int(got_counts[r, h])} tokens, expected "
                f"{int(exp_counts[r, h])}\n  kept per head, expected: {exp_counts.tolist()}\n"
                f"  kept per head, got:      {got_counts.tolist()}")
    r, h, t = (got != expected).nonzero()[0].tolist()
    state = "kept" if bool(got[r, h, t]) else "evicted"
    should = "evicted" if state == "kept" else "kept"
    return f"{what}: right counts per head, but row {r}, head {h}, token {t} is {state}; it should be {should}"


def run_checker(name: str, fn: Callable, worked: list[Case], cases: st.SearchStrategy, reference: Callable,
                compare: Callable[[Any, Any, Case], str | None], mistakes: list[Mistake] = (),
                n_random: int = 40, tol: dict | None = None, error_hints: dict[str, str] | None = None) -> None:
    """Check ``fn`` against ``reference`` on the worked cases, then on ``n_random`` hypothesis cases."""
    tol = tol or {}

    def check_one(case: Case):
        got = call(fn, case, error_hints)
        expected = reference(*clone(case.args), **case.kwargs)
        problem = compare(got, expected, case)
        if problem is not None:
            raise ExerciseFailure(f"{name} is not right yet, on {case.name}:\n  {problem}"
                                  + diagnose(got, case, list(mistakes), **tol) + show_small(case))

    for case in worked:  # NotImplementedError from here reaches the notebook unchanged
        check_one(case)

    not_done: list[NotImplementedError] = []

    @settings(max_examples=n_random, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(cases)
    def random_cases(case):
        try:
            check_one(case)
        except NotImplementedError as e:  # keep hypothesis from shrinking an unfinished stub
            not_done.append(e)

    try:
        random_cases()
    except ExerciseFailure as e:  # drop hypothesis's frames: the message already says everything
        raise ExerciseFailure(str(e)) from None
    if not_done:
        raise not_done[0]
    print(f"✅ {name}: right on the worked example and {n_random} random cases · "
          f"在示例和 {n_random} 个随机用例上全部正确")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_scores(gen: torch.Generator, b: int, n_kv: int, L: int, by_head: bool = False) -> torch.Tensor:
    """(b, n_kv, L) float32 scores, all distinct within a row (no ties, so every Top-K has one answer).

    by_head=True orders the heads: every score of head h is above every score of head h+1, the case
    where heads' scores live on different scales and AdaKV's safeguard matters.
    """
    rows = []
    for _ in range(b):
        values = torch.randperm(n_kv * L, generator=gen).float()  # distinct integers, exact in float32
        if by_head:
            values = values.sort(descending=True).values.reshape(n_kv, L)
            values = values[:, torch.randperm(L, generator=gen)]  # shuffle tokens inside each head
        scale = 2.0 ** torch.randint(-3, 4, (), generator=gen)  # rows on different scales, still exact
        rows.append(values.reshape(n_kv, L) * scale)
    return torch.stack(rows) / 8  # (b, n_kv, L)


@functools.lru_cache(maxsize=1)
def worked():
    """The user's worked example as LayerInputs (4 KV heads, 100 tokens, window 10) and its SnapKV scores."""
    from ..demo import DEMO_WINDOW, worked_example
    from ..scorers import SnapKV

    x = worked_example()
    return x, DEMO_WINDOW, SnapKV(window_size=DEMO_WINDOW).score(x)


WORKED = "the worked example (4 KV heads, 100 tokens, compression ratio 0.5)"
