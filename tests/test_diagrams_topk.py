"""minikv.diagrams.topk draws the same picture in English and Chinese."""

from diagram_checks import check_both_languages

from minikv.diagrams.topk import draw_topk


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_topk, monkeypatch, tmp_path)


def test_counts_come_from_minikv_policies():
    from minikv.diagrams.topk import N_KEPT, SCORES, draw_topk_counts

    counts = draw_topk_counts()
    n_kv = len(SCORES)
    assert counts["uniform"].tolist() == [N_KEPT] * n_kv
    assert int(counts["adakv"].sum()) == n_kv * N_KEPT  # same total, another split
    assert counts["adakv"].tolist() != counts["uniform"].tolist()
    assert int(counts["adakv"].min()) >= 1  # the safeguard keeps the weakest head alive
