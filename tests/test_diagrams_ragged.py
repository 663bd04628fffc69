"""The ragged-layout / split-K diagram draws in both languages, with the numbers minikv.gpu.layout computes."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from minikv.diagrams.ragged import draw_ragged  # noqa: E402


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title(loc="left") for ax in fig.axes]


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_draws_in_both_languages(lang):
    fig = draw_ragged(lang)
    try:
        words = "\n".join(texts(fig))
        has_cjk = any("\u4e00" <= ch <= "\u9fff" for ch in words)
        assert has_cjk == (lang == "zh"), f"{lang}: Chinese labels expected only in zh"
        # lengths (7, 2, 5) + reserve 2 -> capacities 9, 4, 7 -> starts 0, 9, 13
        for s, st in enumerate([0, 9, 13]):
            assert f"starts[{s}] = {st}" in words
        # plan_splits(14 tokens, longest 7, block_n 2, 4 programs) -> chunk 4, 2 chunks; segment 1 has one empty program
        assert ("chunk = 4" in words and "2 chunks" in words) if lang == "en" else ("4 个 Token" in words and "2 个分片" in words)
        assert sum("lo ≥ length" in w for w in texts(fig)) == 1
        assert sum("(m, l, acc)" in w for w in texts(fig)) == 5  # 2 + 1 + 2 chunks that hold tokens
    finally:
        plt.close(fig)


def test_other_lengths_follow_the_layout():
    fig = draw_ragged("en", lengths=(3, 9), reserve=0, block_n=2, programs=3)
    try:
        words = "\n".join(texts(fig))
        assert "starts[1] = 3" in words  # no reserve: segments packed densely
        assert "chunk = 4" in words and "3 chunks" in words  # ceil(12 / 3) = 4 tokens per program; 9 -> 3 chunks
    finally:
        plt.close(fig)


@pytest.mark.parametrize("kwargs, word", [(dict(lang="fr"), "lang"), (dict(lengths=(3, 0)), "lengths"),
                                          (dict(reserve=-1), "reserve")])
def test_bad_input_is_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        draw_ragged(**kwargs)
