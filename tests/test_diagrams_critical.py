"""minikv.diagrams.critical draws the same picture in English and Chinese, chosen by minikv's CriticalAdaKV."""

import torch
from diagram_checks import check_both_languages

from minikv.diagrams.critical import N, N_KEPT, SCORES, critical_stages, draw_critical


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_critical, monkeypatch, tmp_path)


def test_stages_follow_the_definition():
    out = critical_stages()
    s, n = torch.tensor(SCORES), torch.tensor(N)
    budgets, stage1, keep = out["budgets"], out["stage1"], out["keep"]
    assert int(budgets.sum()) == len(SCORES) * N_KEPT  # AdaKV's total
    assert keep.sum(-1).tolist() == budgets.tolist()  # each head fills exactly its budget
    assert bool((stage1 <= keep).all())  # stage 1 survives stage 2
    for h in range(len(SCORES)):
        protected = stage1[h].nonzero().flatten()
        assert len(protected) == max(int(out["n_safe"]), int(budgets[h]) // 2)
        # stage 1 = the head's top tokens by attention alone
        assert set(protected.tolist()) == set(s[h].topk(len(protected)).indices.tolist())
        # stage 2 = the best of the rest by (score + eps) * N
        rest = ((s[h] + 1e-4) * n[h]).masked_fill(stage1[h], float("-inf"))
        n2 = int(budgets[h]) - len(protected)
        assert set((keep[h] & ~stage1[h]).nonzero().flatten().tolist()) == set(rest.topk(n2).indices.tolist())


def test_the_picture_shows_a_token_that_only_n_brings_in():
    out = critical_stages()
    assert bool((out["keep"] & ~out["adakv"]).any()), "no token is kept because of N: the star would be missing"
