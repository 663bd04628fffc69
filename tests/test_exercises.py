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
import torch.nn.functional as F

from minikv.exercises import CHECKERS, ExerciseFailure, reference
from minikv.exercises import (check_adakv_selection, check_critical_adakv, check_floor_ceiling, check_pooling,
                              check_ragged_append, check_ragged_attention, check_safeguard, check_uniform_topk,
                              check_value_norm, check_window_scores)
from minikv.policies import adakv_keep_mask, projected_value_norm, topk_mask_per_head

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


# -- checkers reject plausible wrong implementations, and say why -----------------------------------
# Written the way a learner might, independently of the checkers' own catalogue of mistakes.


def window_no_causal_mask(queries, keys):
    g = queries.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1)
    attn = torch.softmax(queries @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1]), dim=-1)
    return attn[..., : keys.shape[2] - queries.shape[2]].mean(2)


def window_all_columns(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    k = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1])
    logits = logits.masked_fill(torch.ones(w, L, dtype=torch.bool).triu(L - w + 1), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(2)  # forgot to drop the window columns


def pool_no_padding(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, stride=1).reshape(b, n_kv, H // n_kv, -1).mean(2)
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item() + 1)], dim=-1)


def pool_group_max(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).max(dim=2).values
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item() + 1)], dim=-1)


def uniform_global(scores, n_kept):
    b, n_kv, L = scores.shape
    idx = scores.reshape(b, -1).topk(n_kv * n_kept).indices
    return torch.zeros(b, n_kv * L, dtype=torch.bool).scatter(1, idx, True).reshape(b, n_kv, L)


def uniform_int_mask(scores, n_kept):
    return torch.zeros_like(scores, dtype=torch.long).scatter(-1, scores.topk(n_kept).indices, 1)


def uniform_indices(scores, n_kept):
    return scores.topk(n_kept).indices


def safeguard_rounding(scores, n_kept, alpha_safeguard=0.2):
    n = max(1, round(n_kept * alpha_safeguard)) if alpha_safeguard else 0
    out = scores.clone()
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            out[r, h, scores[r, h].topk(n).indices] = torch.finfo(scores.dtype).max
    return out


def adakv_no_safeguard(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = scores.reshape(b, n_kv * L)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(n_kv * n_kept).indices, True).reshape(
        b, n_kv, L)


def adakv_per_head(scores, n_kept, alpha_safeguard=0.2):
    protected = reference.safeguard(scores, n_kept, alpha_safeguard)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, protected.topk(n_kept).indices, True)


def bounds_without_cap(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, int(L * (1 - compression_ratio)))
    n_safe = max(1, int(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, n_safe + n_kv * (n_kept - n_safe)


def value_norm_l2(values, o_proj):
    b, n_kv, L, d = values.shape
    H = o_proj.shape[1] // d
    g = H // n_kv
    out = torch.zeros(b, n_kv, L)
    for h in range(H):
        block = o_proj[:, h * d:(h + 1) * d].float()  # (hidden, d)
        out[:, h // g] += (values.float()[:, h // g] @ block.T).norm(dim=-1) / g
    return out


def value_norm_group_max(values, o_proj):
    b, n_kv, L, d = values.shape
    H = o_proj.shape[1] // d
    g = H // n_kv
    per_head = torch.stack([(values.float()[:, h // g] @ o_proj[:, h * d:(h + 1) * d].float().T).abs().sum(-1)
                            for h in range(H)], dim=1)  # (b, H, L)
    return per_head.reshape(b, n_kv, g, L).amax(2)


def critical_uniform_budgets(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                             first_stage_ratio=0.5):
    budgets = torch.full(scores.shape[:2], n_kept)
    protected = topk_mask_per_head(scores, (budgets * first_stage_ratio).long())
    crit = ((scores + epsilon) * projected_value_norm(values, o_proj)).masked_fill(protected, float("inf"))
    return topk_mask_per_head(crit, budgets)


def critical_no_stage_one(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                          first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    return topk_mask_per_head((scores + epsilon) * projected_value_norm(values, o_proj), budgets)


def append_at_front(keys, values, k_new, v_new):
    return ([[torch.cat([k_new[r, h][None], k]) for h, k in enumerate(row)] for r, row in enumerate(keys)],
            [[torch.cat([v_new[r, h][None], v]) for h, v in enumerate(row)] for r, row in enumerate(values)])


def attention_unscaled(query, keys, values):
    b, H, d = query.shape
    g = H // len(keys[0])
    return torch.stack([torch.stack([torch.softmax(keys[r][h // g] @ query[r, h], 0) @ values[r][h // g]
                                     for h in range(H)]) for r in range(b)])


WRONG = [
    (check_window_scores, window_no_causal_mask, "causal mask is missing"),
    (check_window_scores, window_all_columns, "you kept the w window columns"),
    (check_pooling, pool_no_padding, "pooling without padding changes the length"),
    (check_pooling, pool_group_max, "max over the g query heads"),
    (check_uniform_topk, uniform_global, "one Top-K over all heads"),
    (check_uniform_topk, uniform_int_mask, "wrong dtype: expected torch.bool"),
    (check_uniform_topk, uniform_indices, "if you have the indices"),
    (check_safeguard, safeguard_rounding, "not round()"),
    (check_adakv_selection, adakv_no_safeguard, "AdaKV without the safeguard"),
    (check_adakv_selection, adakv_per_head, "per-head (uniform) selection instead of global"),
    (check_floor_ceiling, bounds_without_cap, "min(L, ...)"),
    (check_value_norm, value_norm_l2, "L2 norm"),
    (check_value_norm, value_norm_group_max, "max over the g query heads"),
    (check_critical_adakv, critical_uniform_budgets, "uniform budgets"),
    (check_critical_adakv, critical_no_stage_one, "stage 1 is missing"),
    (check_ragged_append, append_at_front, "at the *end*"),
    (check_ragged_attention, attention_unscaled, "1/sqrt(d)"),
]


@pytest.mark.parametrize("checker, wrong, hint", WRONG, ids=[w.__name__ for _, w, _ in WRONG])
def test_checker_rejects_a_plausible_mistake_with_a_hint(checker, wrong, hint, capsys):
    with pytest.raises(ExerciseFailure) as info:
        checker(wrong)
    message = str(info.value)
    assert hint in message, message
    assert "not right yet" in message or "wrong" in message
    assert "✅" not in capsys.readouterr().out


def test_failures_say_where():
    with pytest.raises(ExerciseFailure) as info:
        check_adakv_selection(adakv_per_head)
    message = str(info.value)
    # the worked example: which head keeps how many, expected vs got
    assert "row 0, head 0 keeps 50 tokens, expected 66" in message
    assert "[[66, 43, 59, 32]]" in message and "[[50, 50, 50, 50]]" in message
