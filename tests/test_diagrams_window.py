"""minikv.diagrams.window draws the same picture in English and Chinese."""

from diagram_checks import check_both_languages

from minikv.diagrams.window import draw_window


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_window, monkeypatch, tmp_path)


def test_the_window_is_kept_first():
    from minikv.diagrams.window import N_KEPT, PREFIX_SCORES, WINDOW, window_scores
    from minikv.policies.base import topk_mask

    keep = topk_mask(window_scores()[None], N_KEPT)[0]
    assert keep[len(PREFIX_SCORES):].all() and int(keep.sum()) == N_KEPT >= WINDOW
