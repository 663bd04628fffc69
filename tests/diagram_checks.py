"""Shared checks for the lesson diagrams (minikv/diagrams/): one picture, labelled in English or Chinese."""

import re
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts + [ax.title]] + [t.get_text() for t in fig.texts]


def geometry(fig):
    """What is drawn, without the words: per axes, every patch's kind, and where the rectangles are (data units)."""
    def shape(p):
        if isinstance(p, matplotlib.patches.Rectangle):
            return ("Rectangle", round(p.get_x(), 6), round(p.get_y(), 6), round(p.get_width(), 6), round(p.get_height(), 6))
        return (type(p).__name__,)
    return [[shape(p) for p in ax.patches] for ax in fig.axes]


def check_both_languages(draw, monkeypatch, tmp_path):
    figs = {}
    for lang in ("en", "zh"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "Glyph ... missing from font": a Chinese label without its font
            fig = draw(lang)
            fig.savefig(tmp_path / f"{lang}.png", dpi=50)
        assert isinstance(fig, matplotlib.figure.Figure)
        assert (tmp_path / f"{lang}.png").stat().st_size > 1000
        figs[lang] = fig
    en, zh = texts(figs["en"]), texts(figs["zh"])
    assert any(t.strip() for t in en), "the diagram has no labels"
    assert not any(CJK.search(t) for t in en), "Chinese characters in the English diagram"
    assert any(CJK.search(t) for t in zh), "no Chinese label in the Chinese diagram"
    assert len(en) == len(zh), "the two languages should differ only in their labels"
    assert geometry(figs["en"]) == geometry(figs["zh"]), "the two languages draw different pictures"

    # no argument: the language of the notebook's folder (MINIKV_LANG overrides it)
    monkeypatch.setenv("MINIKV_LANG", "zh")
    assert any(CJK.search(t) for t in texts(draw()))
    monkeypatch.setenv("MINIKV_LANG", "en")
    assert not any(CJK.search(t) for t in texts(draw()))
    with pytest.raises(ValueError, match=r"lang must be one of \('en', 'zh'\)"):
        draw("fr")
    plt.close("all")
