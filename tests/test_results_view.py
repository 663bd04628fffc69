"""minikv.results_view: selecting rows, signs of paired CIs, per-layer arrays, needle positions, plots."""

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minikv import results_view as rv  # noqa: E402
from minikv.tasks import Sample  # noqa: E402


def paired_row(ratio, lo, hi, a="adakv_snapkv", b="snapkv", task="heldout:1024", metric="fut_err", n=10):
    return dict(task=task, metric=metric, ratio=ratio, a=a, b=b, n=n, lower_is_better=True, mean_a=0.1, mean_b=0.1,
                mean_diff=(lo + hi) / 2, ci_low=lo, ci_high=hi, a_wins=0.7, b_wins=0.3, ties=0.0)


def test_results_dir_walks_up(tmp_path, monkeypatch):
    (tmp_path / "results" / "eval_x").mkdir(parents=True)
    (tmp_path / "notebooks" / "en").mkdir(parents=True)
    assert rv.results_dir("eval_x", start=tmp_path / "notebooks" / "en") == tmp_path / "results" / "eval_x"
    monkeypatch.chdir(tmp_path / "notebooks")
    assert rv.results_dir("eval_x") == tmp_path / "results" / "eval_x"
    with pytest.raises(FileNotFoundError, match="no results/missing"):
        rv.results_dir("missing", start=tmp_path)
    with pytest.raises(ValueError, match="name must be"):
        rv.results_dir("a/b")


def test_select_and_one():
    rows = [dict(press="snapkv", ratio=0.5), dict(press="snapkv", ratio=0.75), dict(press="knorm", ratio=0.5)]
    assert rv.select(rows, press="snapkv", ratio=0.5 + 1e-12) == [rows[0]]
    assert rv.select(rows, ratio=0.5) == [rows[0], rows[2]]
    assert rv.select(rows, missing_field=1) == []
    assert rv.one(rows, press="knorm") is rows[2]
    with pytest.raises(LookupError, match="2 rows match"):
        rv.one(rows, press="snapkv")
    with pytest.raises(LookupError, match="knorm"):  # says what exists
        rv.one(rows, press="random")


def test_ci_signs():
    rows = [paired_row(0.25, -0.2, -0.1), paired_row(0.5, -0.1, 0.1), paired_row(0.75, 0.01, 0.02),
            paired_row(0.5, -3, -2, a="critical_snapkv")]
    assert rv.ci_signs(rows, "heldout:1024", "fut_err", "adakv_snapkv", "snapkv") == {0.25: -1, 0.5: 0, 0.75: 1}
    assert rv.ci_sign(paired_row(0.5, 0.0, 0.1)) == 0  # touching 0 is not excluding it
    with pytest.raises(LookupError, match="pairs present"):
        rv.ci_signs(rows, "heldout:1024", "fut_err", "knorm", "random")
    with pytest.raises(ValueError, match="no samples"):
        rv.ci_sign(paired_row(0.5, math.nan, math.nan, n=0))


def test_ci_sign_agrees_with_stats_on_the_committed_pairs():
    from minikv import evaluate as ev
    from minikv.stats import ci_excludes_zero

    rows = [r for r in ev.read_paired_csv(rv.results_dir("eval_heldout") / "paired.csv") if r["n"] > 0]
    assert rows
    for r in rows:
        assert (rv.ci_sign(r) != 0) == ci_excludes_zero(r)
        assert rv.ci_sign(r) in (0, int(np.sign(r["mean_diff"])))  # an excluding CI lies on the mean's side


def test_text_tables():
    rows = [paired_row(0.25, -0.2, -0.1), paired_row(0.5, -0.1, 0.1)]
    text = rv.paired_lines(rows, "heldout:1024", "fut_err", [("adakv_snapkv", "snapkv")])
    line = text.splitlines()[-1]
    assert line.startswith("adakv_snapkv - snapkv") and "-0.1500*" in line and "+0.0000 " in line and "70%" in line
    summary = [dict(task="t", metric="accuracy", press="no_press", ratio=0.0, n=8, mean=1.0, ci_low=0.9, ci_high=1.0),
               dict(task="t", metric="accuracy", press="knorm", ratio=0.25, n=8, mean=0.675, ci_low=0.5, ci_high=0.8)]
    text = rv.summary_lines(summary, "t", "accuracy")
    assert "1.00 [0.90, 1.00]  (full cache)" in text and "0.68 [0.50, 0.80]" in text
    with pytest.raises(LookupError, match="tasks present"):
        rv.summary_lines(summary, "other", "accuracy")


def test_accuracy_by_depth():
    recs = [dict(task="passkey:1024", ratio=0.25, press=p, depth=d, correct=c)
            for p, d, c in [("a", 0.1, True), ("a", 0.1, False), ("a", 0.5, True), ("b", 0.5, False)]]
    recs.append(dict(task="passkey:1024", ratio=0.5, press="a", depth=0.9, correct=True))  # another ratio
    acc, depths = rv.accuracy_by_depth(recs, "passkey:1024", 0.25, ["a", "b"])
    assert depths == [0.1, 0.5]
    np.testing.assert_array_equal(acc, [[0.5, 1.0], [np.nan, 0.0]])
    with pytest.raises(LookupError):
        rv.accuracy_by_depth(recs, "passkey:2048", 0.25, ["a"])


class CharTokenizer:
    """One token per character, no chat template: enough for split_chat_template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [ord(c) for c in text]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()


def test_needle_positions():
    s = Sample("passkey", 64, 0, "ab The key is 123. 123 is it. cd", "\n\nWhat?", "123", 0.5)
    n, pos = rv.needle_positions(CharTokenizer(), s)
    assert n == len(s.context) and pos == [14, 15, 16, 19, 20, 21]
    n_aware, pos_aware = rv.needle_positions(CharTokenizer(), s, query_aware=True)
    assert n_aware == len(s.context) + len(s.question) and pos_aware == pos
    with pytest.raises(ValueError, match="not a token subsequence"):
        rv.needle_positions(CharTokenizer(), Sample("passkey", 64, 0, "no key here", "?", "999"))
    assert rv.has_digit("The pass key is 4") and not rv.has_digit("a small wooden box")


def heldout_recs():
    recs = []
    for s in range(3):
        for press, scale in (("snapkv", 2.0), ("adakv_snapkv", 1.0)):
            recs.append(dict(task="heldout:1024", sample=2 - s if press == "snapkv" else s, press=press, ratio=0.5,
                             layers=dict(fut_err=[scale * (s + 1), scale], win_err=[scale, scale / 2],
                                         kept=[[10, 20, 30], [20, 20, 20]])))
    return recs


def test_layer_values_and_safeguard():
    recs = heldout_recs()
    v = rv.layer_values(recs, "heldout:1024", "adakv_snapkv", 0.5, "fut_err")
    np.testing.assert_array_equal(v, [[1, 1], [2, 1], [3, 1]])  # sorted by sample
    kept = rv.layer_values(recs, "heldout:1024", "adakv_snapkv", 0.5, "kept")
    assert kept.shape == (3, 2, 3)
    assert rv.safeguard_binds(kept, 20) == 3 and rv.safeguard_binds(kept, 10) == 0
    with pytest.raises(KeyError, match="per-layer metrics"):
        rv.layer_values(recs, "heldout:1024", "snapkv", 0.5, "nope")
    with pytest.raises(LookupError, match="present"):
        rv.layer_values(recs, "heldout:1024", "knorm", 0.5, "fut_err")


def test_kept_overlap():
    a = np.array([[True, True, False, True]])
    b = np.array([[True, False, False, True, True, True]])  # two extra tokens at the end
    assert rv.kept_overlap(a, b) == pytest.approx(2 / 3)
    assert rv.kept_overlap(a, a) == 1.0
    with pytest.raises(ValueError, match="Lb >= La"):
        rv.kept_overlap(b, a)
    with pytest.raises(ValueError, match="keeps nothing"):
        rv.kept_overlap(np.zeros((1, 3), bool), np.ones((1, 3), bool))


def test_qa_template_em():
    recs = [dict(task="qa0:1024", press="no_press", ratio=0.0, questions=[dict(template="pet", em=True), dict(template="job", em=False)]),
            dict(task="qa0:1024", press="no_press", ratio=0.0, questions=[dict(template="pet", em=False), dict(template="job", em=False)]),
            dict(task="qa0:1024", press="snapkv", ratio=0.5, questions=[dict(template="pet", em=True)])]
    assert rv.qa_template_em(recs, "qa0:1024") == {"job": (0.0, 2), "pet": (0.5, 2)}
    assert rv.qa_template_em(recs, "qa0:1024", "snapkv", 0.5) == {"pet": (1.0, 1)}
    with pytest.raises(LookupError):
        rv.qa_template_em(recs, "qa:1024")


def test_plots_draw():
    import matplotlib.pyplot as plt

    summary = [dict(task="t", metric="accuracy", press="no_press", ratio=0.0, n=8, mean=1.0, ci_low=0.9, ci_high=1.0)]
    summary += [dict(task="t", metric="accuracy", press="snapkv", ratio=x, n=8, mean=0.5, ci_low=0.4, ci_high=0.6) for x in (0.25, 0.5)]
    fig = rv.plot_modes({"one": summary, "two": summary}, "t")
    assert len(fig.axes) == 2
    recs = [dict(task="t", ratio=0.25, press=p, depth=d, correct=True) for p in ("a", "b") for d in (0.1, 0.9)]
    fig = rv.plot_depth_heatmaps({"x": recs}, "t", 0.25, ["a", "b"])
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    fig = rv.plot_layer_errors(heldout_recs(), "heldout:1024", 0.5)
    red = fig.axes[1].lines[0].get_ydata()  # held-out reduction per layer: adakv is half of snapkv's error
    np.testing.assert_allclose(red, [0.5, 0.5])
    with pytest.raises(ValueError, match="two presses"):
        rv.plot_layer_errors(heldout_recs(), "heldout:1024", 0.5, presses=("snapkv",))
    plt.close("all")


def test_head_share_lower():
    recs = [dict(task="h", sample=s, press=p, ratio=0.5, layers=dict(fut_head_err=e))
            for s in range(2) for p, e in (("a", [[1.0, 2.0], [3.0, 0.5]]), ("b", [[2.0, 1.0], [4.0, 0.6]]))]
    assert rv.head_share_lower(recs, "h", "a", "b", 0.5) == 0.75  # a is lower in 3 of the 4 heads
    assert rv.head_share_lower(recs, "h", "b", "a", 0.5) == 0.25
    with pytest.raises(ValueError, match="samples, layers, heads"):
        rv.head_share_lower([dict(task="h", sample=0, press=p, ratio=0.5, layers=dict(fut_head_err=[1.0])) for p in "ab"],
                            "h", "a", "b", 0.5)
