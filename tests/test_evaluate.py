"""python -m minikv eval: tasks, scoring, confidence intervals, results files, resumability."""

import json
import math

import pytest
import torch

from minikv import evaluate as ev
from minikv.tasks import DEPTHS, HAYSTACK_SENTENCES, fidelity_sample, make_samples, multifact_sample, passkey_sample, prose_paragraphs


# ---------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", ["passkey", "multifact", "fidelity"])
def test_samples_are_deterministic(task):
    a, b = make_samples(task, 512, 6, seed=3), make_samples(task, 512, 6, seed=3)
    assert [(s.context, s.question, s.answer) for s in a] == [(s.context, s.question, s.answer) for s in b]
    assert len({s.context for s in a}) == 6  # different samples differ
    assert make_samples(task, 512, 1, seed=4)[0].context != a[0].context  # and so do seeds


@pytest.mark.parametrize("i", range(10))
def test_passkey_answer_is_in_the_context_at_its_depth(i):
    s = passkey_sample(i, 1024)
    assert len(s.answer) == 5 and s.answer.isdigit()
    assert s.context.count(s.answer) == 2  # "The pass key is K. Remember it. K is the pass key."
    assert s.depth == DEPTHS[i % len(DEPTHS)]
    where = s.context.index(s.answer) / len(s.context)
    assert abs(where - s.depth) < 0.1


@pytest.mark.parametrize("i", range(10))
def test_multifact_answer_is_in_the_context_and_distractors_differ(i):
    s = multifact_sample(i, 2048)
    room = s.meta["room"]
    assert f"The code of room {room} is {s.answer}." in s.context
    assert str(room) in s.question and s.answer not in s.question
    assert len(set(s.meta["distractors"] + [s.answer])) == 6
    assert all(f" is {c}." in s.context for c in s.meta["distractors"])


def test_fidelity_uses_every_shipped_paragraph_once():
    paragraphs = prose_paragraphs()
    assert len(paragraphs) >= 10
    s = fidelity_sample(0)
    assert sorted(s.context.split("\n\n")) == sorted(paragraphs)
    assert fidelity_sample(1).context != s.context


def test_haystack_sentences_are_distinct_and_unknown_task_is_refused():
    assert len(set(HAYSTACK_SENTENCES)) == len(HAYSTACK_SENTENCES)
    with pytest.raises(ValueError, match="known tasks"):
        make_samples("summarise", 512, 1)
    with pytest.raises(ValueError, match="NAME:TOKENS"):
        ev.parse_tasks("passkey")
    assert ev.parse_tasks("passkey:1024, fidelity:768") == [("passkey", 1024), ("fidelity", 768)]


# ---------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("answer, expected, right", [
    ("The pass key is 35741.", "35741", True),
    ("35741", "35741", True),
    ("The pass key is 35742.", "35741", False),
    ("The pass key is a small carved box.", "35741", False),
    ("The code of room 314 is 5821.", "5821", True),  # the 3-digit room number is not an answer
    ("4821 or 5821", "5821", False),  # a distractor first is wrong
    ("The pass key is 357410.", "35741", False),  # a longer number is not the key
    ("", "35741", False),
])
def test_score_answer(answer, expected, right):
    assert ev.score_answer(answer, expected) is right


def test_fidelity_scores_by_hand():
    p = torch.tensor([[[0.2, 0.8], [0.5, 0.5]]]).log()  # (b=1, C=2, vocab=2)
    q = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]).log()
    kl, top1 = ev.fidelity_scores(p, q)
    by_hand = 0.2 * math.log(0.2 / 0.9) + 0.8 * math.log(0.8 / 0.1)  # 1.3628 at position 0, 0 at position 1
    assert kl.item() == pytest.approx(by_hand / 2, rel=1e-5)
    assert top1.item() == pytest.approx(0.5)  # disagree at 0 (1 vs 0), agree at 1
    kl0, top0 = ev.fidelity_scores(p, p)
    assert kl0.item() == 0 and top0.item() == 1


# ---------------------------------------------------------------------------------- intervals
def test_wilson_interval_known_values():
    assert ev.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert ev.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert ev.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert ev.wilson_interval(64, 128) == pytest.approx((0.4147, 0.5853), abs=1e-4)  # symmetric at p = 1/2
    assert all(math.isnan(x) for x in ev.wilson_interval(0, 0))


def test_bootstrap_interval():
    assert ev.bootstrap_interval([0.3] * 5) == (0.3, 0.3)
    x = torch.linspace(0, 1, 101).tolist()
    lo, hi = ev.bootstrap_interval(x)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.2915 / 10, rel=0.15)  # ~ normal CI of the mean
    assert ev.bootstrap_interval(x) == (lo, hi)  # seeded


def _rec(press, ratio, sample, correct=None, kl=None, task="passkey:512"):
    r = dict(task=task, sample=sample, press=press, ratio=ratio, query_aware=False, cache_bytes=50, full_cache_bytes=100)
    r.update(correct=correct) if kl is None else r.update(kl=kl, top1=1.0)
    return r


def test_summarize_counts_and_intervals():
    recs = [_rec("snapkv", 0.5, i, correct=i < 8) for i in range(10)] + [_rec("no_press", 0.0, 0, correct=True)]
    recs += [_rec("snapkv", 0.5, i, kl=0.1 * i, task="fidelity:128") for i in range(4)]
    rows = {(r["task"], r["metric"], r["press"]): r for r in ev.summarize(recs)}
    acc = rows[("passkey:512", "accuracy", "snapkv")]
    assert (acc["n"], acc["mean"]) == (10, 0.8) and (acc["ci_low"], acc["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert acc["kept_fraction"] == 0.5
    assert rows[("fidelity:128", "kl", "snapkv")]["mean"] == pytest.approx(0.15)
    assert rows[("fidelity:128", "top1", "snapkv")]["mean"] == 1.0


def test_cells_run_no_press_once():
    assert ev.cells(["no_press", "snapkv"], [0.25, 0.5]) == [("no_press", 0.0), ("snapkv", 0.25), ("snapkv", 0.5)]
    assert ev.interleave([[1, 2, 3], ["a"]]) == [1, "a", 2, 3]


def test_summary_only_writes_csv_and_plot(tmp_path):
    from minikv.__main__ import main

    recs = [_rec(p, r, i, correct=(i + int(10 * r)) % 3 == 0) for p, rs in (("no_press", [0.0]), ("snapkv", [0.25, 0.5]))
            for r in rs for i in range(6)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut sho')
    assert main(["eval", "--summary-only", "--out", str(tmp_path)]) == 0
    rows = ev.read_csv(tmp_path / "summary.csv")
    assert [(r["press"], r["ratio"], r["n"]) for r in rows] == [("no_press", 0.0, 6), ("snapkv", 0.25, 6), ("snapkv", 0.5, 6)]
    assert (tmp_path / "plot.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------- on SmolLM2
@pytest.mark.model
def test_batches_of_equal_length_for_smollm2(smollm2):
    _, tok = smollm2
    for name, n in (("passkey", 512), ("multifact", 512)):
        batches = ev.make_batches(tok, name, n, 10, 5, seed=0, query_aware=False)
        assert [len(b["samples"]) for b in batches] == [5, 5]  # six-token sentences: no split by length
    (b,) = ev.make_batches(tok, "fidelity", 128, 3, 8, seed=0, query_aware=False)
    assert b["ctx_ids"].shape == (3, 128) and b["cont_ids"].shape == (3, ev.CONTINUATION_TOKENS)


@pytest.mark.model
def test_eval_resumes_and_second_run_does_nothing(smollm2, tmp_path, monkeypatch):
    import minikv.hf
    from minikv.__main__ import main

    monkeypatch.setattr(minikv.hf, "load_model", lambda *a, **k: smollm2)  # the session's model, loaded once
    argv = ["eval", "--tasks", "passkey:160,fidelity:96", "--samples", "1", "--presses", "no_press,adakv_snapkv",
            "--ratios", "0.5", "--max-new-tokens", "2", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4  # 2 tasks x (no_press + adakv_snapkv at 0.5) x 1 sample
    recs = {(r["task"], r["press"]): r for r in map(json.loads, lines)}
    full = recs[("passkey:160", "no_press")]
    assert full["expected"] == passkey_sample(0, 160).answer and full["context_tokens"] > 128  # 2 new tokens: no full answer
    ada = recs[("passkey:160", "adakv_snapkv")]
    assert ada["cache_bytes"] < full["cache_bytes"] and ada["kept_min"] <= ada["kept_mean"] <= ada["kept_max"]
    assert recs[("fidelity:96", "no_press")]["kl"] == 0 and recs[("fidelity:96", "no_press")]["top1"] == 1
    assert recs[("fidelity:96", "adakv_snapkv")]["kl"] > 0
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["new_records"] == 4 and meta["model_sha256"]

    assert main(argv) == 0  # again: everything is there already
    assert (tmp_path / "samples.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "run.json").read_text())["new_records"] == 0
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "plot.png").exists()
