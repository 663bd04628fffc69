"""minikv.diagrams.cache draws the same picture in English and Chinese."""

from diagram_checks import check_both_languages

from minikv.diagrams.cache import draw_cache


def test_draws_in_both_languages(monkeypatch, tmp_path):
    check_both_languages(draw_cache, monkeypatch, tmp_path)
