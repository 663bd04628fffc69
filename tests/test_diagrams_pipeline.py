"""minikv.diagrams.pipeline draws the same picture in English and Chinese."""

from diagram_checks import check_both_languages

from minikv.diagrams.pipeline import draw_pipeline


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_pipeline, monkeypatch, tmp_path)
