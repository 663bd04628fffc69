"""The machinery every checker shares: run the learner's function, compare, explain.

A checker runs the learner's function on

1. lesson 02's worked example (4 KV heads, 100 tokens, ``minikv.demo.worked_example()``), then
2. fixed edge cases, then random small cases -- first a set drawn independently from fixed seeds
   (smallest first), then more drawn by hypothesis (derandomized, so a run repeats exactly; a
   failure is shrunk to a small case): several batch rows, every argument of the function varied
   (alpha including 0, epsilon, ratios, window and kernel sizes), half-precision inputs and tied
   scores where they matter,

compares every result with minikv's reference implementation, and on the first difference raises
:class:`ExerciseFailure` saying *what* differs (shape, dtype, which row / head / token, expected vs
got). The learner's function gets copies of the inputs; if it changes them in place, that is a
failure too.

Hints come in two levels, the idea first and then the code::

    Hint 1 (idea): ...
    Hint 2 (code): ...

A catalogued mistake (:class:`Mistake`) is hinted only when it *reproduces* the learner's answer:
on the failing case itself, and on most of the probe cases (the worked and edge cases plus a fixed
set of random cases without ties) on which the mistake goes wrong. A wrong answer that merely also
differs from the right one gets no hint.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException


class ExerciseFailure(AssertionError):
    """The learner's function gave a wrong answer; the message says where and, if it can, why.

    ``hints`` holds the (idea, code) pairs the message shows, for tools that want them separately.
    """

    def __init__(self, message: str = "", hints: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.hints = list(hints or [])


ExerciseFailure.__module__ = "minikv.exercises"  # how tracebacks name it


@dataclass
class Case:
    """One input of a checker: a description for messages, the arguments, and whether scores may tie."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    ties: bool = False

    def __repr__(self) -> str:  # hypothesis prints this in its "Falsifying example" note
        return f"Case({self.name})"


@dataclass
class Mistake:
    """A plausible wrong implementation, and the two hints to give when the learner's answer equals it."""

    fn: Callable
    idea: str
    code: str


_HINT_LEVEL = [2]


def set_hint_level(level: int) -> None:
    """How much a failure message tells: 1 = the idea only, 2 = the idea and then the code (the default).

    >>> set_hint_level(1)   # try with the concept alone; set_hint_level(2) shows the code hint again
    """
    if level not in (1, 2):
        raise ValueError(f"level must be 1 (idea only) or 2 (idea, then code), got {level!r}")
    _HINT_LEVEL[0] = level


def hint_text(idea: str, code: str = "") -> str:
    """The two-level hint as it appears in a message: the concept first, then the code."""
    if code and _HINT_LEVEL[0] == 1:
        return (f"\n  Hint 1 (idea): {idea}\n  (Hint 2, the code, is hidden: "
                "minikv.exercises.set_hint_level(2) shows it)")
    return f"\n  Hint 1 (idea): {idea}" + (f"\n  Hint 2 (code): {code}" if code else "")


INPLACE_IDEA = ("your function must leave its inputs as they were: the caller (a press, the next "
                "exercise) still reads them after you; build and return a new tensor instead")
INPLACE_CODE = ("use out-of-place operations -- x.scatter(...), x.masked_fill(...), torch.cat(...) -- "
                "not x.scatter_(...), x[...] = ..., list.append(...); or start from out = x.clone()")


def _first_change(before, after, name: str) -> str | None:
    """How ``after`` (the copy the learner's function got) differs from ``before``; None if it does not."""
    if isinstance(before, torch.Tensor):
        if not isinstance(after, torch.Tensor):
            return f"`{name}` (a tensor, replaced by {type(after).__name__})"
        if after.shape != before.shape or after.dtype != before.dtype:
            return (f"`{name}`: it was a tensor{tuple(before.shape)} {str(before.dtype).replace('torch.', '')}, "
                    f"now tensor{tuple(after.shape)} {str(after.dtype).replace('torch.', '')}")
        if before.dtype.is_floating_point:
            same_entry = (before == after) | (before.isnan() & after.isnan())
        else:
            same_entry = before == after
        if bool(same_entry.all()):
            return None
        first = tuple(int(i) for i in (~same_entry).nonzero()[0])
        where = f"[{', '.join(map(str, first))}]" if first else ""
        return (f"`{name}`: {int((~same_entry).sum())} of {before.numel()} entries changed, e.g. {name}{where} "
                f"was {fmt(before[first])}, now {fmt(after[first])}")
    if isinstance(before, (list, tuple)):
        if not isinstance(after, (list, tuple)) or len(after) != len(before):
            now = len(after) if isinstance(after, (list, tuple)) else type(after).__name__
            return f"`{name}` (a list of {len(before)}, now of {now})"
        for i, (b, a) in enumerate(zip(before, after)):
            change = _first_change(b, a, f"{name}[{i}]")
            if change:
                return change
    return None


def call(fn: Callable, case: Case, names: tuple[str, ...] = (),
         error_hints: dict[str, tuple[str, str]] | None = None) -> Any:
    """Run the learner's function on copies of the case's inputs.

    NotImplementedError passes through untouched (the notebook guard prints it); any other crash
    becomes an explained failure (error_hints maps a piece of an error message to the (idea, code)
    hints about its usual cause); changing an input in place is a failure even when the answer is right.
    """
    args, kwargs = clone(case.args), clone(case.kwargs)
    try:
        got = fn(*args, **kwargs)
    except (NotImplementedError, ExerciseFailure):
        raise
    except Exception as e:  # any other crash becomes an explained failure
        hints = [h for key, h in (error_hints or {}).items() if key in str(e)]
        raise ExerciseFailure(f"on {case.name}: your function raised {type(e).__name__}: {e}\n"
                              f"  inputs: {describe(case.args)}" + "".join(hint_text(*h) for h in hints),
                              hints) from e
    for i, (before, after) in enumerate(zip(case.args, args)):
        change = _first_change(before, after, names[i] if i < len(names) else f"argument {i + 1}")
        if change:
            raise ExerciseFailure(f"on {case.name}: your function changed its input {change}"
                                  + hint_text(INPLACE_IDEA, INPLACE_CODE), [(INPLACE_IDEA, INPLACE_CODE)])
    return got


def clone(x):
    """Deep copy of tensors in nested tuples/lists/dicts, so every call gets fresh inputs."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
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


def dtype_tol(dtype: torch.dtype, atol: float, rtol: float) -> tuple[float, float]:
    """Tolerances for a result of this dtype: half precision rounds at the 3rd significant digit.

    Exact comparisons (atol = rtol = 0) stay exact in every dtype.
    """
    if atol == 0 and rtol == 0:
        return 0.0, 0.0
    if dtype == torch.float16:
        return max(atol, 1e-3), max(rtol, 1e-2)
    if dtype == torch.bfloat16:
        return max(atol, 4e-3), max(rtol, 4e-2)
    return atol, rtol


def same(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """True when two results agree (tensors: same shape and close values; tuples: element-wise)."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y, atol, rtol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        if a.dtype == torch.bool or b.dtype == torch.bool:
            return bool((a.bool() == b.bool()).all())
        at, rt = dtype_tol(a.dtype if a.dtype in (torch.float16, torch.bfloat16) else b.dtype, atol, rtol)
        return bool(torch.isclose(a.double(), b.double(), atol=at, rtol=rt, equal_nan=True).all())
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def resolve_ties(scores: torch.Tensor, favored: torch.Tensor) -> torch.Tensor:
    """Scores without ties, in the same order, with every tie broken in favour of ``favored`` entries.

    Returns float64 ranks over the whole tensor (0 = lowest). Used to judge a keep mask when scores tie:
    any choice among tied tokens is right, so the reference runs on the ranks that prefer the learner's
    choice; a learner who keeps *more* than the budget (``>=`` a threshold) still differs.
    """
    flat, fav = scores.double().flatten(), favored.flatten().long()
    by_fav = fav.argsort(stable=True)  # unfavoured first
    order = by_fav[flat[by_fav].argsort(stable=True)]  # by score, then unfavoured before favoured
    ranks = torch.empty_like(flat)
    ranks[order] = torch.arange(flat.numel(), dtype=torch.float64)
    return ranks.reshape(scores.shape)


def has_ties(scores: torch.Tensor) -> bool:
    """True when two entries of a (b, n_kv, L) tensor tie within a batch row."""
    flat = scores.reshape(scores.shape[0], -1)
    return flat.shape[1] != 0 and any(row.unique().numel() < row.numel() for row in flat)


def _run(f: Callable, case: Case):
    """f on fresh copies of the case's inputs; an exception is returned, not raised."""
    try:
        return f(*clone(case.args), **clone(case.kwargs))
    except Exception as e:
        return e


def _agree(a, b, tol: dict) -> bool:
    return not isinstance(a, Exception) and not isinstance(b, Exception) and same(a, b, **tol)


#: a catalogued mistake must reproduce the learner's answer on at least this share of the probe cases
#: on which the mistake itself is wrong (so a second, small slip of the learner does not hide the hint)
AGREEMENT = 0.75


def diagnose(fn: Callable, got, case: Case, mistakes: list[Mistake], probes: list[Case],
             tol: dict, reference: Callable | None = None, expected: Any = None) -> list[Mistake]:
    """The catalogued mistakes that explain the learner's answer.

    A mistake is a candidate only when, on the failing ``case`` itself, it is wrong (differs from
    ``expected``, when given) and reproduces the learner's answer. It is confirmed when, on the probe
    cases where the mistake gives a wrong answer, the learner gives that same wrong answer at least
    AGREEMENT of the time. Of several confirmed mistakes, the ones reproduced on the most probe cases
    win (the most evidence).
    """
    outputs = [(m, _run(m.fn, case)) for m in mistakes]
    candidates = [m for m, wrong in outputs if _agree(got, wrong, tol)
                  and (expected is None or not _agree(wrong, expected, tol))]
    if not candidates or reference is None:
        return candidates
    learner = [_run(fn, p) for p in probes]
    right = [_run(reference, p) for p in probes]
    scored = []
    for m in candidates:
        wrong = [_run(m.fn, p) for p in probes]
        telling = [i for i in range(len(probes)) if not _agree(wrong[i], right[i], tol)]
        matched = sum(_agree(learner[i], wrong[i], tol) for i in telling)
        if not telling or matched >= AGREEMENT * len(telling):
            scored.append((matched, m))
    best = max((n for n, _ in scored), default=0)
    return [m for n, m in scored if n == best]


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


def exact(x: float) -> str:
    """x for a message about floor(x): short when the short form has the same floor, else in full.

    So 0.2 * 7 = 1.4000000000000001 reads floor(1.4) = 1, but 100 * (1 - 0.9) reads
    floor(9.999999999999998) = 9 -- never the wrong-looking floor(10) = 9.
    """
    short = f"{x:.6g}"
    return short if math.floor(float(short)) == math.floor(x) else repr(x)


def compare_tensor(got, expected: torch.Tensor, what: str, axes: tuple[str, ...], atol: float = 1e-5,
                   rtol: float = 1e-4, shape_hints: dict | None = None) -> str | None:
    """None when ``got`` matches ``expected``; else a precise explanation of the first problem.

    axes names the dimensions for messages, e.g. ("row", "head", "token"). Half-precision results get
    half-precision tolerances (:func:`dtype_tol`).
    shape_hints maps a wrong shape (tuple) to the (idea, code) hints of how one gets it.
    """
    if not isinstance(got, torch.Tensor):
        return f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
    if got.shape != expected.shape:
        msg = (f"{what}: wrong shape: expected ({', '.join(axes)}) = {tuple(expected.shape)}, "
               f"got {tuple(got.shape)}")
        hint = (shape_hints or {}).get(tuple(got.shape))
        return msg + (hint_text(*hint) if hint else "")
    if got.dtype != expected.dtype:
        msg = f"{what}: wrong dtype: expected {expected.dtype}, got {got.dtype}"
        if expected.dtype in (torch.float16, torch.bfloat16) and got.dtype == torch.float32:
            msg += hint_text("the result keeps the inputs' dtype; compute in float32 where the spec says so, then "
                             "cast back", f"... .to({expected.dtype}) (or .to(input.dtype)); a tensor made with "
                             "torch.full / torch.zeros / torch.empty is float32 unless you pass dtype=")
        return msg
    if expected.dtype == torch.bool:
        bad = got != expected
    else:
        at, rt = dtype_tol(expected.dtype, atol, rtol)
        bad = ~torch.isclose(got.double(), expected.double(), atol=at, rtol=rt, equal_nan=True)
    if not bad.any():
        return None
    first = tuple(bad.nonzero()[0].tolist())
    where = ", ".join(f"{a} {i}" for a, i in zip(axes, first))
    msg = (f"{what}: {int(bad.sum())} of {bad.numel()} entries differ; first at {where}: "
           f"expected {fmt(expected[first])}, got {fmt(got[first])}")
    if expected.dtype != torch.bool and got.isinf().any() and not expected.isinf().any():
        msg += "\n  (your result holds inf, e.g. a value too large for " + str(got.dtype).replace("torch.", "") + ")"
    return msg


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


INDICES_HINT = ("a keep mask is a bool tensor of the scores' shape, True = kept",
                "scatter True at the kept indices: torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)")


def compare_keep(got, expected: torch.Tensor, what: str = "keep mask") -> str | None:
    """Compare (b, n_kv, L) bool keep masks, reporting per-head counts before single tokens."""
    problem = compare_tensor(got, expected, what, ("row", "head", "token"))
    if problem is None or not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != torch.bool:
        if problem and isinstance(got, torch.Tensor) and not got.dtype.is_floating_point and got.dtype != torch.bool:
            problem += hint_text(*INDICES_HINT)
        return problem
    got_counts, exp_counts = got.sum(-1), expected.sum(-1)  # (b, n_kv)
    if not torch.equal(got_counts, exp_counts):
        r, h = (got_counts != exp_counts).nonzero()[0].tolist()
        return (f"{what}: row {r}, head {h} keeps {_tokens(int(got_counts[r, h]))}, expected "
                f"{int(exp_counts[r, h])}\n  kept per head, expected: {exp_counts.tolist()}\n"
                f"  kept per head, got:      {got_counts.tolist()}")
    r, h, t = (got != expected).nonzero()[0].tolist()
    state = "kept" if bool(got[r, h, t]) else "evicted"
    should = "evicted" if state == "kept" else "kept"
    return f"{what}: right counts per head, but row {r}, head {h}, token {t} is {state}; it should be {should}"


def _size(case: Case) -> int:
    """How big a case is to read: the number of tensor entries, plus the integer arguments."""
    def size(x):
        if isinstance(x, torch.Tensor):
            return x.numel()
        if isinstance(x, (list, tuple)):
            return sum(size(v) for v in x)
        return x if isinstance(x, int) else 0
    return size(case.args)


class Draw:
    """What a case builder draws its parameters with: hypothesis while checking (so failures shrink),
    or a seeded ``random.Random`` for the probe cases (independent, varied draws)."""

    def __init__(self, draw: Callable | None = None, rng: random.Random | None = None):
        self._draw, self._rng = draw, rng

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]; hypothesis shrinks it towards lo."""
        return self._draw(st.integers(lo, hi)) if self._draw else self._rng.randint(lo, hi)

    def pick(self, options):
        """One of the options; hypothesis shrinks towards the first."""
        options = list(options)
        return self._draw(st.sampled_from(options)) if self._draw else self._rng.choice(options)


_PROBES: dict[str, tuple[list[Case], list[Case]]] = {}

#: checker name -> what its last run compared against (probes, tied cases, reference, mistakes, tol), for tests
LAST_RUN: dict[str, dict] = {}


def probe_cases(key: str, build: Callable[[Draw], Case], n: int = 24) -> tuple[list[Case], list[Case]]:
    """n random cases without ties, and a few with ties, drawn independently from fixed seeds.

    A catalogued mistake must reproduce the learner's answer on the tie-free ones (plus the worked and
    edge cases) before its hint is given; with ties the right answer is not unique, which proves nothing.
    """
    if key not in _PROBES:
        plain, tied = [], []
        for seed in range(8 * n):
            case = build(Draw(rng=random.Random(seed)))
            (tied if case.ties else plain).append(case)
            if len(plain) >= n and len(tied) >= n // 4:
                break
        _PROBES[key] = plain[:n], tied[: n // 4]
    return _PROBES[key]


def run_checker(name: str, fn: Callable, worked: list[Case], cases: Callable[[Draw], Case], reference: Callable,
                compare: Callable[[Any, Any, Case], str | None], mistakes: list[Mistake] = (),
                n_random: int = 40, tol: dict | None = None,
                error_hints: dict[str, tuple[str, str]] | None = None,
                expect: Callable[[Case, Any], Any] | None = None) -> None:
    """Check ``fn`` against ``reference`` on the worked (and edge) cases, then on ``n_random`` hypothesis cases.

    cases(draw) builds one random case from a :class:`Draw`.
    Runs on one CPU thread: the tensors are tiny, and a thread pool only adds overhead (a lot of it on a
    busy machine); the caller's thread count is restored afterwards.

    expect(case, got) gives the right answer for a case when it depends on the learner's own choice
    (ties broken either way); by default it is reference(*case.args, **case.kwargs).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_checker(name, fn, worked, cases, reference, compare, mistakes, n_random, tol, error_hints, expect)
    finally:
        torch.set_num_threads(threads)


def _run_checker(name, fn, worked, cases, reference, compare, mistakes, n_random, tol, error_hints, expect):
    tol = tol or {}
    names = tuple(inspect.signature(reference).parameters)
    mistakes = list(mistakes)
    random_probes, tied = probe_cases(name, cases)
    probes = list(worked) + random_probes
    LAST_RUN[name] = {"probes": probes, "tied": tied, "reference": reference, "mistakes": mistakes, "tol": tol,
                      "expect": expect}

    def explain(got, case: Case, problem: str, expected: Any = None) -> ExerciseFailure:
        """The full failure for one case, with the hints of every catalogued mistake that reproduces it."""
        hints = [(m.idea, m.code) for m in diagnose(fn, got, case, mistakes, probes, tol, reference, expected)]
        return ExerciseFailure(f"{name} is not right yet, on {case.name}:\n  {problem}"
                               + "".join(hint_text(*h) for h in hints) + show_small(case), hints)

    def check_one(case: Case):
        got = call(fn, case, names, error_hints)
        expected = None
        try:
            expected = expect(case, got) if expect else reference(*clone(case.args), **clone(case.kwargs))
            problem = compare(got, expected, case)
        except Exception as e:  # an answer too odd to compare (e.g. a list where a tensor belongs)
            problem = (f"could not compare your answer with the right one ({type(e).__name__}: {e}); "
                       f"your function returned {type(got).__name__}")
        if problem is not None:
            wrong = ExerciseFailure(f"{name} is not right yet, on {case.name}:\n  {problem}")
            wrong.pending = (got, case, problem, expected)  # explained once, after hypothesis has shrunk the case
            raise wrong

    try:
        for case in worked:  # NotImplementedError from here reaches the notebook unchanged
            check_one(case)
        for case in sorted(random_probes + tied, key=lambda c: (c.ties, _size(c))):  # smallest first, ties last
            check_one(case)
    except ExerciseFailure as e:
        raise (explain(*e.pending) if hasattr(e, "pending") else e) from None

    not_done: list[NotImplementedError] = []

    @settings(max_examples=n_random, derandomize=True, database=None, deadline=None, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(st.composite(lambda draw: cases(Draw(draw)))())
    def random_cases(case):
        try:
            check_one(case)
        except NotImplementedError as e:  # keep hypothesis from shrinking an unfinished stub
            not_done.append(e)

    try:
        random_cases()
    except ExerciseFailure as e:  # drop hypothesis's frames: the message already says everything
        raise (explain(*e.pending) if hasattr(e, "pending") else ExerciseFailure(str(e), e.hints)) from None
    except BaseExceptionGroup as group:  # e.g. hypothesis's FlakyFailure: several failures at once
        raise _from_group(name, group, explain) from None
    except HypothesisException as e:  # Flaky & co.: the same case passed once and failed once
        raise ExerciseFailure(f"{name}: {_FLAKY} ({type(e).__name__}: {e})") from None
    if not_done:
        raise not_done[0]
    edges, n = len(worked) - 1, n_random + len(random_probes) + len(tied)
    print(f"✅ {name}: right on the worked example" + (f", {edges} edge cases " if edges > 0 else " ")
          + f"and {n} random cases · " + (f"在示例、{edges} 个边界用例" if edges > 0 else "在示例")
          + f"和 {n} 个随机用例上全部正确")


_FLAKY = ("your function gave different answers for the same input (does it use randomness, or state "
          "kept between calls?)")


def _from_group(name: str, group: BaseExceptionGroup, explain: Callable) -> ExerciseFailure:
    """One ExerciseFailure for a group of exceptions: the first explained failure, else a plain account."""
    failures = group.subgroup(lambda e: isinstance(e, ExerciseFailure))
    if failures is None:
        return ExerciseFailure(f"{name}: the check stopped with {type(group).__name__}: {group}")
    first = failures.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    if hasattr(first, "pending"):
        first = explain(*first.pending)
    flaky = "Flaky" in type(group).__name__
    return ExerciseFailure((f"{name}: {_FLAKY}\n" if flaky else "") + str(first), first.hints)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_scores(gen: torch.Generator, b: int, n_kv: int, L: int, by_head: bool = False) -> torch.Tensor:
    """(b, n_kv, L) float32 scores, all distinct within a row (no ties, so every Top-K has one answer).

    by_head=True orders the heads: every score of head h is above every score of head h+1, the case
    where heads' scores live on different scales and AdaKV's safeguard matters.
    The values are multiples of 1/8 below 100 times a power of two: exact in float16 and bfloat16 too.
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


def tied_scores(gen: torch.Generator, b: int, n_kv: int, L: int) -> torch.Tensor:
    """(b, n_kv, L) float32 scores drawn from only a few values, so ties sit at every Top-K boundary."""
    return torch.randint(0, 4, (b, n_kv, L), generator=gen).float() / 4


@functools.lru_cache(maxsize=1)
def worked():
    """Lesson 02's worked example as LayerInputs (4 KV heads, 100 tokens, window 10) and its SnapKV scores."""
    from ..demo import DEMO_WINDOW, worked_example
    from ..scorers import SnapKV

    x = worked_example()
    return x, DEMO_WINDOW, SnapKV(window_size=DEMO_WINDOW).score(x)


WORKED = "the worked example of lesson 02 (4 KV heads, 100 tokens, compression ratio 0.5)"
