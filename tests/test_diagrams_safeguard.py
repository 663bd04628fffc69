"""minikv.diagrams.safeguard draws the same picture in English and Chinese, from minikv's own budget arithmetic."""

from diagram_checks import check_both_languages

from minikv import head_ceiling, n_kept, n_safe
from minikv.diagrams.safeguard import ALPHA, CR, L, N_KV, budget_numbers, draw_safeguard, splits


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_safeguard, monkeypatch, tmp_path)


def test_numbers_come_from_minikv_budget():
    b = budget_numbers()
    k = n_kept(L, CR)
    assert (b["n_kept"], b["n_safe"]) == (k, n_safe(k, ALPHA))
    assert b["ceiling"] == head_ceiling(k, b["n_safe"], N_KV, L) < L  # the ceiling binds below L here
    assert b["n_safe"] < b["n_kept"] < b["ceiling"]


def test_every_split_conserves_the_total_and_respects_floor_and_ceiling():
    b = budget_numbers()
    for name, split in splits().items():
        assert len(split) == N_KV, name
        assert sum(split) == N_KV * b["n_kept"], f"{name}: {split} does not sum to n_kv * n_kept"
        assert all(b["n_safe"] <= c <= b["ceiling"] for c in split), f"{name}: {split} leaves [floor, ceiling]"
    assert max(splits()["extreme"]) == b["ceiling"]  # the ceiling is reached exactly when the others sit at the floor
