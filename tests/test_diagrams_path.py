"""The learning-path picture follows the exercise notebooks' links."""

import pytest

from minikv.diagrams.path import LESSONS, draw_path, lesson_links


def test_every_exercise_links_to_a_lesson():
    links = lesson_links()
    assert sorted(links) == [f"{i:02d}" for i in range(1, 10)]
    for ex, lessons in links.items():
        assert lessons, f"exercise {ex} links to no lesson"
        assert set(lessons) <= set(LESSONS), f"exercise {ex} links to an unknown lesson {lessons}"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_path_draws_in_both_languages(lang):
    import matplotlib

    matplotlib.use("Agg")
    fig = draw_path(lang)
    n_arrows = sum(len(v) for v in lesson_links().values()) + len(LESSONS) - 1
    assert len(fig.axes[0].patches) == len(LESSONS) + 9 + n_arrows
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert ("课程" in texts) == (lang == "zh")


def test_committed_picture_exists():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for lang in ("en", "zh"):
        assert (root / "notebooks" / f"path_{lang}.png").stat().st_size > 10_000
