"""The exercises: generated from the solutions without drift, and checkers that accept minikv and explain mistakes."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import math
import pathlib

import nbformat
import pytest
import torch

from minikv.exercises import CHECKERS, ExerciseFailure, reference
from minikv.exercises import (check_adakv_selection, check_critical_adakv, check_floor_ceiling, check_pooling,
                              check_ragged_append, check_ragged_attention, check_safeguard, check_topk_per_head,
                              check_uniform_topk, check_value_norm, check_window_scores)
from minikv.policies import topk_mask_per_head

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_exercises", ROOT / "scripts" / "make_exercises.py")
make_exercises = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_exercises)

SOLUTIONS = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))


# -- generation -----------------------------------------------------------------------------------


def test_at_least_eight_exercises_each_with_a_checker():
    assert len(SOLUTIONS) >= 8
    assert [p.name for p in EXERCISES] == [p.name for p in SOLUTIONS]
    assert {p.name[:2] for p in SOLUTIONS} == set(CHECKERS)


def test_regenerating_from_solutions_changes_nothing():
    generated = make_exercises.generate()  # in memory
    for path in EXERCISES:
        have = nbformat.read(path, as_version=4)
        want = generated[path.name]
        assert [(c.cell_type, c.source) for c in have.cells] == [(c.cell_type, c.source) for c in want.cells], (
            f"{path.name} drifted from solutions/: run python scripts/make_exercises.py")
    assert make_exercises.drift() == []
    assert make_exercises.main(["--check"]) == 0


def test_check_mode_reports_drift(tmp_path, monkeypatch):
    for p in SOLUTIONS[:1]:
        (tmp_path / p.name).write_text(p.read_text())  # an "exercise" that still holds the solution
    monkeypatch.setattr(make_exercises, "EXERCISES", tmp_path)
    problems = make_exercises.drift()
    assert any(SOLUTIONS[0].name in p for p in problems)
    assert any("is missing" in p for p in problems)
    assert make_exercises.main(["--check"]) == 1


def test_strip_solutions_keeps_indentation_and_hint():
    src = ("def f(x):\n    \"\"\"doc\"\"\"\n    ### BEGIN SOLUTION\n    ### HINT: add one\n"
           "    ### HINT: to x\n    return x + 1\n    ### END SOLUTION\n\nprint('after')")
    out = make_exercises.strip_solutions(src)
    assert "return x + 1" not in out and "BEGIN SOLUTION" not in out and "print('after')" in out
    namespace: dict = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="hint: add one to x"):
        namespace["f"](1)


@pytest.mark.parametrize("src, problem", [
    ("### BEGIN SOLUTION\n### HINT: h\nx = 1\n", "has no"),
    ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", "needs a"),
    ("x = 1\n### END SOLUTION\n", "outside"),
    ("### BEGIN SOLUTION\n### HINT: h\n### BEGIN SOLUTION\n### END SOLUTION\n", "nested"),
])
def test_malformed_regions_are_refused(src, problem):
    with pytest.raises(make_exercises.MarkerError, match=problem):
        make_exercises.strip_solutions(src)


def test_exercises_have_no_solutions_and_no_outputs():
    for path in EXERCISES:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert "BEGIN SOLUTION" not in cell.source and "### HINT" not in cell.source, path.name
                assert cell.outputs == [] and cell.execution_count is None, path.name


# -- self-contained text ---------------------------------------------------------------------------

OUTSIDE = ("SPEC.md", "the notes", "notes'", "user's", "../shared", "/work/", "笔记中", "笔记的")


def test_exercises_cite_nothing_outside_the_repository():
    texts = {p.name: "\n".join(c.source for c in nbformat.read(p, as_version=4).cells) for p in SOLUTIONS + EXERCISES}
    for path in [*(ROOT / "minikv" / "exercises").glob("*.py"), ROOT / "solutions" / "README.md",
                 ROOT / "exercises" / "README.md"]:
        texts[str(path.relative_to(ROOT))] = path.read_text()
    for name, text in texts.items():
        for outside in OUTSIDE:
            assert outside not in text, f"{name} cites {outside!r}"


@pytest.mark.parametrize("path", SOLUTIONS + EXERCISES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_exercise_links_back_to_its_lesson_in_both_languages(path):
    import re

    cells = nbformat.read(path, as_version=4).cells
    intro_en, intro_zh = cells[0].source, cells[1].source
    assert intro_en.startswith("# Exercise") and intro_zh.startswith("# 练习")
    for intro in (intro_en, intro_zh):
        links = re.findall(r"\]\((\.\./notebooks/(en|zh)/[0-9][0-9]_\w+\.ipynb)\)", intro)
        assert {lang for _, lang in links} == {"en", "zh"}, intro
        for link, _ in links:
            assert (path.parent / link).resolve().exists(), link


# -- notebooks, run in-process ---------------------------------------------------------------------


def _run_cells(path):
    """Execute a notebook's code cells in one namespace; return (namespace, stdout)."""
    namespace: dict = {"__name__": "__notebook__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                exec(compile(cell.source, f"{path.name}", "exec"), namespace)
    return namespace, out.getvalue()


def _stub_names(path):
    """Functions an exercise notebook asks the learner to write (their body raises NotImplementedError)."""
    names = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(n, ast.Raise) and "NotImplementedError" in ast.unparse(n) for n in ast.walk(node)):
                names.append(node.name)
    return names


def _checker_cells(path):
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" and "check_" in c.source
            and "import" not in c.source]


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_exercise_stubs_raise_not_implemented_with_a_hint(path):
    namespace, _ = _run_cells(path)
    names = _stub_names(path)
    assert names, f"{path.name} has no stub"
    for name in names:
        fn = namespace[name]
        n_args = fn.__code__.co_argcount
        with pytest.raises(NotImplementedError) as info:
            fn(*[None] * n_args)
        message = str(info.value)
        assert message.startswith("hint: ") and len(message) > 40, f"{name}: hint too thin: {message!r}"


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.stem)
def test_unfinished_exercise_runs_top_to_bottom(path):
    _, out = _run_cells(path)  # raises if a checker cell lets NotImplementedError through
    cells = _checker_cells(path)
    assert cells and all("except NotImplementedError" in c.source for c in cells)
    assert out.count("Not done yet") == len(cells)
    assert "✅" not in out


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_pass_their_checkers_and_are_committed_executed(path):
    _, out = _run_cells(path)
    cells = _checker_cells(path)
    assert out.count("✅") == len(cells) and "Not done yet" not in out
    for cell in cells:  # committed with the outputs of a real run
        text = "".join(o.get("text", "") for o in cell.outputs)
        assert "✅" in text, f"{path.name}: execute the notebook before committing (outputs missing)"


# -- checkers accept minikv ------------------------------------------------------------------------

REFERENCE = {
    check_window_scores: reference.window_scores,
    check_pooling: reference.pool_group_window,
    check_uniform_topk: reference.uniform_keep_mask,
    check_safeguard: reference.safeguard,
    check_adakv_selection: reference.adakv_keep_mask,
    check_floor_ceiling: reference.floor_ceiling,
    check_value_norm: reference.projected_value_norm,
    check_topk_per_head: topk_mask_per_head,
    check_critical_adakv: reference.critical_adakv_keep_mask,
    check_ragged_append: reference.append_token,
    check_ragged_attention: reference.ragged_attention,
}


def test_every_checker_has_a_reference():
    assert set(REFERENCE) == {c for cs in CHECKERS.values() for c in cs}


@pytest.mark.parametrize("checker", list(REFERENCE), ids=lambda c: c.__name__)
def test_checker_accepts_the_reference(checker, capsys):
    checker(REFERENCE[checker])
    assert "✅" in capsys.readouterr().out


def test_reference_scores_compose_to_snapkv():
    from minikv import snapkv_scores
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 6, 5, 8, generator=gen), torch.randn(2, 3, 30, 8, generator=gen)
    ours = reference.pool_group_window(reference.window_scores(q, k), 3, 5)
    torch.testing.assert_close(ours, snapkv_scores(q, k, window_size=5))


@pytest.mark.parametrize("checker", list(REFERENCE), ids=lambda c: c.__name__)
def test_checker_passes_not_implemented_through_unchanged(checker):
    error = NotImplementedError("hint: not yet")

    def stub(*args, **kwargs):
        raise error

    with pytest.raises(NotImplementedError) as info:
        checker(stub)
    assert info.value is error


def test_checker_explains_a_crash():
    def crashes(queries, keys):
        raise ValueError("boom")

    with pytest.raises(ExerciseFailure, match=r"raised ValueError: boom(.|\n)*tensor\(1, 8, 10, 32\)"):
        check_window_scores(crashes)


# -- how failures are reported -------------------------------------------------------------------------
# (the learner-style wrong implementations are in tests/test_exercises_mistakes.py)


def test_two_different_failures_make_one_exercise_failure_not_an_exception_group():
    def two_bugs(queries, keys):  # right on every fixed case; on hypothesis's smallest cases, two different bugs
        out = reference.window_scores(queries, keys)
        if queries.shape[:3] == (1, 1, 1) and keys.shape[2] == 2:
            raise TypeError("tiny")
        return out * 2 if queries.shape[:3] == (1, 1, 1) and keys.shape[2] == 3 else out

    with pytest.raises(ExerciseFailure) as info:
        check_window_scores(two_bugs)
    assert type(info.value) is ExerciseFailure and "random case" in str(info.value)


def test_an_exception_group_becomes_its_first_explained_failure():
    from minikv.exercises._check import _from_group

    group = ExceptionGroup("two bugs", [ValueError("x"), ExerciseFailure("the first", [("idea", "code")])])
    failure = _from_group("f", group, explain=lambda *pending: None)
    assert type(failure) is ExerciseFailure and "the first" in str(failure) and failure.hints == [("idea", "code")]
    assert "ExceptionGroup" in str(_from_group("f", ExceptionGroup("g", [ValueError("y")]), explain=None))


def test_a_function_that_answers_differently_each_time_gets_an_exercise_failure():
    seen = set()

    def flaky(scores, n_kept):  # wrong only the first time it sees one particular (tiny) input
        mask = reference.uniform_keep_mask(scores, n_kept)
        if scores.shape == (1, 1, 1) and not seen:
            seen.add(1)
            return ~mask
        return mask

    with pytest.raises(ExerciseFailure, match="different answers for the same input"):
        check_uniform_topk(flaky)


def test_a_right_answer_that_edits_the_input_in_place_is_rejected():
    def protects_in_place(scores, n_kept, alpha_safeguard=0.2):
        right = reference.safeguard(scores, n_kept, alpha_safeguard)
        scores.copy_(right)  # the caller's scores change too
        return right

    with pytest.raises(ExerciseFailure) as info:
        check_safeguard(protects_in_place)
    message = str(info.value)
    assert "changed its input `scores`" in message
    assert message.index("Hint 1 (idea)") < message.index("Hint 2 (code)")


def test_hint_level_one_keeps_the_code_hint_back():
    from minikv.exercises import set_hint_level

    def alpha_ignored(scores, n_kept, alpha_safeguard=0.2):
        return reference.adakv_keep_mask(scores, n_kept, 0.0)

    try:
        set_hint_level(1)
        with pytest.raises(ExerciseFailure) as info:
            check_adakv_selection(alpha_ignored)
        assert "Hint 1 (idea): AdaKV without the safeguard" in str(info.value)
        assert "Hint 2 (code)" not in str(info.value) and "set_hint_level(2)" in str(info.value)
    finally:
        set_hint_level(2)
    with pytest.raises(ExerciseFailure, match=r"Hint 2 \(code\)"):
        check_adakv_selection(alpha_ignored)
    with pytest.raises(ValueError, match="level must be 1"):
        set_hint_level(3)


def test_the_n_safe_message_is_arithmetically_right():
    from minikv.exercises.selection import bounds_story, n_safe_story

    assert n_safe_story(1, 0.0) == "alpha_safeguard = 0 means no safeguard: n_safe = 0"
    assert "max(1" not in n_safe_story(7, 0.0)
    assert n_safe_story(7, 0.2) == "n_safe = max(1, floor(0.2 · 7)) = max(1, floor(1.4)) = max(1, 1) = 1"
    assert "floor(2.9999999999999996)) = max(1, 2) = 2" in n_safe_story(3, 0.9999999999999999)
    assert n_safe_story(50, 0.2).endswith("= 10")
    assert "floor(9.999999999999998)) = max(1, 9) = 9" in bounds_story(100, 0.9, 4, 0.2)
    assert "floor(62.99999999999999)) = max(1, 62) = 62" in bounds_story(90, 0.3, 4, 1.0)


@pytest.mark.parametrize("L, cr, n_kv, alpha", [(L, cr, n_kv, a) for L in (1, 7, 90, 100, 333)
                                                for cr in (0.0, 0.3, 0.5, 0.9, 0.99) for n_kv in (1, 4)
                                                for a in (0.0, 0.1, 0.2, 1.0)])
def test_every_floor_in_a_message_is_computed_right(L, cr, n_kv, alpha):
    import re

    from minikv.exercises.selection import bounds_story

    story = bounds_story(L, cr, n_kv, alpha)
    steps = re.findall(r"floor\(([0-9.e+-]+)\)\)? = (?:max\(1, )?([0-9]+)", story)
    assert steps, story
    for product, floor in steps:
        assert math.floor(float(product)) == int(floor), story
    assert story.endswith(f"= {reference.floor_ceiling(L, cr, n_kv, alpha)[1]}")
    floor_line = story.splitlines()[1]
    assert floor_line.split("(the floor)")[0].strip().endswith(f"= {reference.floor_ceiling(L, cr, n_kv, alpha)[0]}")


def test_a_failure_for_alpha_zero_says_no_safeguard():
    def always_one(scores, n_kept, alpha_safeguard=0.2):
        return reference.safeguard(scores, n_kept, alpha_safeguard or 0.01)  # alpha = 0 still protects one

    with pytest.raises(ExerciseFailure) as info:
        check_safeguard(always_one)
    message = str(info.value)
    assert "alpha_safeguard = 0 means no safeguard: n_safe = 0" in message
    assert "floor(0.0" not in message and "floor(0 " not in message
