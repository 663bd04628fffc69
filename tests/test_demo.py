"""The worked example of lesson 02 (minikv.demo): the hand-built scores, the synthetic layer, the README block."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

from minikv import AdaKV, SnapKV, Uniform, get_press
from minikv.demo import (DEMO_NEEDS, DEMO_WINDOW, needed_positions, run_demo, worked_example,
                         worked_example_scores)
from minikv.policies.adakv import adakv_budgets, adakv_keep_mask

README = Path(__file__).resolve().parent.parent / "README.md"
L, N_KEPT = 100, 50


def kept_sets(keep):
    return [set(keep[0, h].nonzero().flatten().tolist()) for h in range(keep.shape[1])]


def test_ideal_scores_give_each_head_what_it_needs():
    scores = worked_example_scores("ideal")
    assert scores.shape == (1, len(DEMO_NEEDS), L)
    window = set(range(L - DEMO_WINDOW, L))
    kept = kept_sets(adakv_keep_mask(scores, N_KEPT, 0.2))
    for h, pos in enumerate(needed_positions()):
        assert kept[h] == set(pos.tolist()) | window, f"head {h}"
    budgets = adakv_budgets(scores, N_KEPT)[0].tolist()
    assert budgets == [n + DEMO_WINDOW for n in DEMO_NEEDS]
    assert sum(budgets) == len(DEMO_NEEDS) * N_KEPT  # the needs add up to the layer's budget
    # the safeguard (10 per head) is already met by the window: switching it off changes nothing
    assert adakv_budgets(scores, N_KEPT, 0.0).tolist() == [budgets]


def test_ideal_scores_look_like_attention():
    prefix = worked_example_scores("ideal")[0, :, : L - DEMO_WINDOW]  # (n_kv, L - w)
    assert torch.allclose(prefix.sum(-1), torch.ones(len(DEMO_NEEDS)), atol=0.05)
    for h, pos in enumerate(needed_positions()):
        others = torch.ones(L - DEMO_WINDOW, dtype=torch.bool)
        others[pos] = False
        assert prefix[h, pos].min() > prefix[h, others].max()


def test_needed_positions_match_the_layer():
    # the needed tokens are the ones whose keys point along the head's query direction
    x = worked_example()
    q = x.queries[0].reshape(len(DEMO_NEEDS), -1, x.keys.shape[-1]).mean(1)  # (n_kv, d)
    align = torch.einsum("hld,hd->hl", x.keys[0, :, : L - DEMO_WINDOW], q)  # (n_kv, L - w)
    for h, pos in enumerate(needed_positions()):
        assert set(align[h].topk(len(pos)).indices.tolist()) == set(pos.tolist()), f"head {h}"


def test_without_pooling_snapkv_finds_exactly_the_needed_tokens():
    x = worked_example()
    keep = AdaKV(SnapKV(window_size=DEMO_WINDOW, kernel_size=1), 0.5).select(x).keep
    window = set(range(L - DEMO_WINDOW, L))
    for h, (got, pos) in enumerate(zip(kept_sets(keep), needed_positions())):
        assert got == set(pos.tolist()) | window, f"head {h}"


def test_pooling_only_moves_pairs_at_span_edges():
    x = worked_example()
    pooled = AdaKV(SnapKV(window_size=DEMO_WINDOW, kernel_size=5), 0.5).select(x).keep[0]
    plain = AdaKV(SnapKV(window_size=DEMO_WINDOW, kernel_size=1), 0.5).select(x).keep[0]
    moved = (pooled != plain).nonzero().tolist()
    assert moved, "pooling should change a few pairs in this example"
    for h, i in moved:
        needed = torch.zeros(L, dtype=torch.bool)
        needed[needed_positions()[h]] = True
        near = needed[max(0, i - 2): i + 3]
        at_edge = near.any() and not near.all() or i < 2  # a needed/unneeded boundary within 2 tokens
        assert at_edge, f"head {h}, token {i} moved but is not within 2 tokens of a span edge"


def test_snapkv_kind_is_snapkv_on_the_layer():
    s = worked_example_scores("snapkv")
    assert torch.equal(s, SnapKV(window_size=DEMO_WINDOW).score(worked_example()))
    assert torch.equal(adakv_keep_mask(s, N_KEPT), get_press("adakv_snapkv", 0.5, window_size=DEMO_WINDOW)
                       .select(worked_example()).keep)
    assert torch.equal(Uniform(SnapKV(window_size=DEMO_WINDOW), 0.5).select(worked_example()).counts,
                       torch.full((1, 4), N_KEPT))


def test_default_window_would_leave_no_room():
    # with kvpress's window of 64 and L = 100, the 64 window tokens fill a 50-token budget alone
    x = worked_example()
    wide = type(x)(x.keys, x.values, torch.randn(1, x.queries.shape[1], 64, x.keys.shape[-1]), x.o_proj)
    for name in ("snapkv", "adakv_snapkv"):
        keep = get_press(name, 0.5).select(wide).keep
        assert keep[..., : L - 64].sum() == 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"kind must be one of \('ideal', 'snapkv'\), got 'notes'"):
        worked_example_scores("notes")
    with pytest.raises(ValueError, match="needs"):
        worked_example(needs=(65, 30, 50, 20))


def test_readme_shows_what_the_demo_prints(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_demo(str(tmp_path / "demo.png"))
    printed = out.getvalue().splitlines()
    text = README.read_text(encoding="utf-8")
    block = re.search(r"## What the demo prints[^\n]*\n+```\n(.*?)```", text, re.S)
    assert block, "README.md has no 'What the demo prints' code block"
    shown = [line for line in block.group(1).splitlines() if line.strip()]
    for line in shown:
        assert line in printed, f"README shows a line the demo does not print: {line!r}"
    table = [line for line in printed if re.match(r"(press|snapkv|adakv|critical)", line)]
    assert set(table) <= set(shown), "every row of the demo's table is in the README block"
    assert (tmp_path / "demo.png").stat().st_size > 0
