"""minikv.diagrams.heldout draws the same picture in English and Chinese."""

from diagram_checks import check_both_languages

from minikv.diagrams.heldout import draw_heldout


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_heldout, monkeypatch, tmp_path)


def test_the_window_is_kept_and_the_budget_holds():
    from minikv.diagrams.heldout import N_KEPT, PREFIX_SCORES, WINDOW, kept_mask

    keep = kept_mask()
    assert len(keep) == len(PREFIX_SCORES) + WINDOW
    assert keep[-WINDOW:].all() and int(keep.sum()) == N_KEPT
    assert not keep[:-WINDOW].all()  # something is evicted, else there is nothing to measure
