"""Held-out fidelity, continuation and QA tasks of `python -m minikv eval`, paired statistics, and
the safety of the results files (a killed run resumes without losing or mislabelling records)."""

import json
import math

import numpy as np
import pytest
import torch

from minikv import evaluate as ev
from minikv.fidelity import budget_shift, causal_attention, layer_fidelity, long_dependent_tokens, output_and_mass
from minikv.scorers.base import LayerInputs
from minikv.stats import ci_excludes_zero, paired_difference


# ---------------------------------------------------------------------------------- fidelity
def _layer(b=2, n_kv=2, g=3, L=40, C=8, d=8, hidden=12, w=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = L + C
    k, v = torch.randn(b, n_kv, T, d, generator=gen), torch.randn(b, n_kv, T, d, generator=gen)
    q = torch.randn(b, n_kv * g, w + C, d, generator=gen)
    o = torch.randn(hidden, n_kv * g * d, generator=gen)
    return LayerInputs(k, v, q, o), L, w


def test_keeping_everything_changes_nothing():
    li, L, w = _layer()
    keep = torch.ones(2, 2, L, dtype=torch.bool)
    r = layer_fidelity(li, L, w, keep)
    for part in ("future", "window"):
        assert r[part]["layer_err"].abs().max() < 1e-6
        assert r[part]["head_mass"].abs().max() == 0


def test_output_error_by_hand_one_head():
    # one KV head, one query head, hidden = d, W_o = identity: y is the attention output itself
    li, L, w = _layer(b=1, n_kv=1, g=1, hidden=8, d=8)
    li = LayerInputs(li.keys, li.values, li.queries, torch.eye(8))
    keep = torch.ones(1, 1, L, dtype=torch.bool)
    keep[0, 0, 5:20] = False
    r = layer_fidelity(li, L, w, keep)
    q = li.queries[:, :, w:]  # the C future queries at positions L..
    a = torch.softmax((q @ li.keys.transpose(-1, -2) / 8 ** 0.5).masked_fill(
        torch.arange(L + 8) > (L + torch.arange(8))[:, None], float("-inf")), -1)  # (1, 1, C, T)
    full = a @ li.values
    a2 = a.clone()
    a2[..., 5:20] = 0
    kept = (a2 / a2.sum(-1, keepdim=True)) @ li.values
    want = ((kept - full).norm(dim=-1) / full.norm(dim=-1)).mean()
    assert r["future"]["layer_err"].item() == pytest.approx(want.item(), rel=1e-4)
    assert r["future"]["head_mass"].item() == pytest.approx(a[..., 5:20].sum(-1).mean().item(), rel=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_adakv_bound_holds_per_query_head(seed):
    # Ada-KV's bound: ||o_kept - o_full||_1 <= 2 * (evicted mass) * max_i ||v_i||_1, for each head and query
    li, L, w = _layer(b=1, n_kv=2, g=2, seed=seed)
    keep = torch.rand(1, 2, L + 8, generator=torch.Generator().manual_seed(seed)) > 0.5
    q, k, v = li.queries, li.keys, li.values
    a_full = causal_attention(q, k, L - w)
    a_kept = causal_attention(q, k, L - w, keep)
    vv = v.repeat_interleave(2, dim=1)
    err = (a_kept @ vv - a_full @ vv).abs().sum(-1)  # (1, H, m)
    mass = (a_full * (~keep).repeat_interleave(2, dim=1)[:, :, None, :]).sum(-1)
    bound = 2 * mass * vv.abs().sum(-1).max(-1).values[..., None]
    assert (err <= bound + 1e-5).all()


def test_output_and_mass_evicting_all_but_one_token():
    li, L, w = _layer(b=1, n_kv=1, g=1)
    keep = torch.zeros(1, 1, L + 8, dtype=torch.bool)
    keep[..., 0] = True  # every query still sees token 0
    _, y_kept, mass = output_and_mass(li.queries, li.keys, li.values, li.o_proj, L - w, keep)
    want = (li.values[0, 0, 0] @ li.o_proj.T)  # the output is token 0's value through W_o
    assert torch.allclose(y_kept[0, 0], want.expand_as(y_kept[0, 0]), atol=1e-5)
    assert (mass > 0).all() and (mass < 1).all()


def test_budget_shift():
    assert budget_shift(torch.tensor([50, 50, 50, 50])).item() == 0
    assert budget_shift(torch.tensor([70, 40, 60, 30])).item() == pytest.approx(30 / 200)
    assert budget_shift(torch.tensor([200, 0, 0, 0])).item() == pytest.approx(150 / 200)


def test_long_dependent_tokens():
    full = torch.tensor([[-1.0, -0.5, -3.0]])
    short = torch.tensor([[-4.0, -0.6, -3.0]])
    assert long_dependent_tokens(full, short, 2.0).tolist() == [[True, False, False]]


# ---------------------------------------------------------------------------------- paired stats
def test_paired_difference_signs_and_symmetry():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.05, 200)
    b = a + 0.02 + rng.normal(0, 0.01, 200)  # b is worse (higher) than a on almost every sample
    d = paired_difference(a, b, lower_is_better=True)
    assert d["n"] == 200 and d["ci_low"] <= d["mean_diff"] <= d["ci_high"] < 0
    assert d["a_wins"] > 0.9 and d["a_wins"] + d["b_wins"] + d["ties"] == pytest.approx(1)
    assert ci_excludes_zero(d)
    e = paired_difference(b, a, lower_is_better=True)
    assert e["mean_diff"] == pytest.approx(-d["mean_diff"]) and e["b_wins"] == d["a_wins"]
    f = paired_difference(a, b, lower_is_better=False)
    assert f["b_wins"] == d["a_wins"]  # "better" flips with the metric's direction


def test_paired_difference_drops_nan_pairs_and_rejects_unpaired():
    d = paired_difference([1.0, float("nan"), 3.0], [0.5, 2.0, float("nan")], lower_is_better=False)
    assert d["n"] == 1 and d["mean_diff"] == 0.5
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0], [1.0], lower_is_better=True)


def test_noise_gives_an_interval_around_zero():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 300), rng.normal(0, 1, 300)
    d = paired_difference(a, b, lower_is_better=True)
    assert d["ci_low"] < 0 < d["ci_high"] and not ci_excludes_zero(d)


def test_paired_summary_pairs_by_sample():
    recs = []
    for s in range(20):
        recs.append(dict(task="heldout:64", sample=s, press="snapkv", ratio=0.5, fut_err=0.30 + s * 0.01, win_err=0.1,
                         fut_mass=0.1, win_mass=0.05, shift=0.0))
        recs.append(dict(task="heldout:64", sample=s, press="adakv_snapkv", ratio=0.5, fut_err=0.28 + s * 0.01, win_err=0.08,
                         fut_mass=0.09, win_mass=0.04, shift=0.1))
    rows = {(r["metric"], r["a"], r["b"]): r for r in ev.paired_summary(recs)}
    r = rows[("fut_err", "adakv_snapkv", "snapkv")]
    assert r["n"] == 20 and r["mean_diff"] == pytest.approx(-0.02) and r["a_wins"] == 1.0
    assert ("shift", "adakv_snapkv", "snapkv") not in rows  # descriptive, not a score


# ---------------------------------------------------------------------------------- press specs
def test_parse_press_puts_parameters_where_they_belong():
    p = ev.parse_press("snapkv+window_size=16+pooling=max+kernel_size=7", 0.5)
    assert (p.scorer.window_size, p.scorer.pooling, p.scorer.kernel_size) == (16, "max", 7)
    a = ev.parse_press("adakv_snapkv+alpha_safeguard=0.05", 0.25)
    assert a.alpha_safeguard == 0.05 and a.compression_ratio == 0.25 and a.scorer.window_size == 64
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ev.parse_press("snapkv+window_size", 0.5)
    with pytest.raises(Exception, match="unknown press"):
        ev.parse_press("snapkvv", 0.5)


# ---------------------------------------------------------------------------------- files
def _write(path, recs, tail=""):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs) + tail)


def test_repair_tail_cuts_only_a_half_written_line(tmp_path):
    p = tmp_path / "samples.jsonl"
    recs = [dict(task="t", sample=i) for i in range(3)]
    _write(p, recs)
    assert ev.repair_tail(p) == 0 and len(ev.load_records(p)) == 3
    _write(p, recs, tail='{"task": "t", "sam')  # killed while writing record 4
    assert ev.repair_tail(p) == len('{"task": "t", "sam')
    with open(p, "a") as f:
        ev.append_records(f, [dict(task="t", sample=3)])
    got = ev.load_records(p)
    assert [r["sample"] for r in got] == [0, 1, 2, 3]  # the resumed record is whole, not glued to the half line
    p.write_text('{"half')  # a file that is only a half line
    assert ev.repair_tail(p) == 6 and p.read_text() == ""


def test_settings_are_checked_before_resuming(tmp_path):
    s = dict(model="m.gguf", model_sha256="abc", dtype="float32", seed=0, max_new_tokens=16, continuation_tokens=64, heldout_tokens=128, record_format=2)
    ev.check_settings(tmp_path, s)
    ev.check_settings(tmp_path, dict(s))  # the same settings resume
    with pytest.raises(SystemExit, match="seed: folder has 0, this run 1"):
        ev.check_settings(tmp_path, dict(s, seed=1))
    with pytest.raises(SystemExit, match="dtype"):
        ev.check_settings(tmp_path, dict(s, dtype="bfloat16"))
    other = tmp_path / "old"
    other.mkdir()
    (other / "samples.jsonl").write_text('{"task": "passkey:1024"}\n')
    with pytest.raises(SystemExit, match="without settings.json"):
        ev.check_settings(other, s)


def test_qa_metric_counts_only_templates_the_full_cache_answers():
    def rec(press, em_a, em_b):
        return dict(task="qa:512", sample=0, press=press, ratio=0.0 if press == "no_press" else 0.5,
                    questions=[dict(template="a", em=em_a, logp=-1.0), dict(template="b", em=em_b, logp=-5.0)])
    recs = [rec("no_press", True, False), rec("snapkv", False, True)]
    keep = ev.qa_templates_kept(recs)
    assert keep == {"qa:512": {"a"}}
    assert ev.metric_value(recs[1], "em", keep) == 0.0 and ev.metric_value(recs[1], "logp", keep) == -1.0


# ---------------------------------------------------------------------------------- tasks
def test_natural_text_windows_are_disjoint_and_bounded():
    from minikv.tasks import natural_text_windows

    class Tok:  # one token per character: enough to test the cutting
        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            class R:
                input_ids = torch.tensor([[ord(c) for c in text[:5000]]])
            return R()

    w = natural_text_windows(Tok(), 100, 20, 10)
    assert w.shape == (10, 120)
    assert not torch.equal(w[0], w[1])
    with pytest.raises(ValueError, match="disjoint windows"):
        natural_text_windows(Tok(), 100, 20, 1000)


@pytest.mark.model
def test_qa_samples(smollm2):
    from minikv.tasks import QA_TEMPLATES, qa_sample

    _, tok = smollm2
    a, b = qa_sample(tok, 3, 512), qa_sample(tok, 3, 512)
    assert a.context_ids == b.context_ids and qa_sample(tok, 4, 512).context_ids != a.context_ids
    assert len(a.context_ids) == 512 and len(qa_sample(tok, 7, 512).context_ids) == 512  # equal rows: batches need no padding
    text = tok.decode(a.context_ids)
    assert len({q["template"] for q in a.questions}) == len(a.questions) == 4
    for q in a.questions:
        fact = QA_TEMPLATES[q["template"]][0]
        assert fact.format(name=q["name"], v=q["answer"]) in text  # the asked fact is in the context
        assert tok.decode(q["prefix_ids"]) + " " + q["answer"] in text  # worded as the answer prefix
        same = [v for v in QA_TEMPLATES[q["template"]][3] if v != q["answer"] and fact.split("{name}")[1].format(v=v) in text]
        assert same, f"no distractor of template {q['template']} in the context"
        assert 0 <= q["depth"] <= 1


@pytest.mark.model
def test_eval_new_tasks_resume_after_a_kill(smollm2, tmp_path, monkeypatch):
    """A small real run of the three new tasks; then a kill mid-line, a resume, and a refused rerun."""
    import minikv.hf

    monkeypatch.setattr(minikv.hf, "load_model", lambda *a, **k: smollm2)
    from minikv.__main__ import main

    args = ["eval", "--tasks", "heldout:256,longppl:256,qa:384", "--samples", "1", "--batch-size", "1",
            "--presses", "no_press,snapkv,adakv_snapkv+window_size=16,adakv_snapkv", "--ratios", "0.5", "--out", str(tmp_path),
            "--no-progress"]
    assert main(args) == 0
    jsonl = tmp_path / "samples.jsonl"
    recs = ev.load_records(jsonl)
    assert len(recs) == 3 * 1 * 4  # tasks x samples x (no_press + 3 presses)
    by = {(r["task"], r["press"], r["sample"]): r for r in recs}
    assert by[("heldout:256", "no_press", 0)]["fut_err"] == pytest.approx(0, abs=1e-5)
    assert by[("heldout:256", "snapkv", 0)]["fut_err"] > 0
    assert len(by[("heldout:256", "snapkv", 0)]["layers"]["fut_err"]) == 30
    assert by[("longppl:256", "no_press", 0)]["kl"] == pytest.approx(0, abs=1e-4)
    assert by[("qa:384", "snapkv", 0)]["questions"][0]["template"]
    pairs = {(r["a"], r["b"]) for r in ev.read_paired_csv(tmp_path / "paired.csv")}
    assert pairs == {("adakv_snapkv", "snapkv"), ("adakv_snapkv+window_size=16", "adakv_snapkv")}
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "paired.png").exists()
    # kill mid-write: the last record is cut in half
    text = jsonl.read_text()
    jsonl.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    assert main(args) == 0
    again = ev.load_records(jsonl)
    assert len(again) == len(recs)
    assert sorted(map(ev.record_key, again)) == sorted(map(ev.record_key, recs))
    with pytest.raises(SystemExit, match="other settings"):
        main(args + ["--seed", "1"])


def test_qa_people_share_no_first_or_last_name():
    from minikv.tasks import qa_sample

    class Tok:  # a stand-in tokenizer: one id per character (the names are what is tested)
        chat_template = None

        def __call__(self, text, add_special_tokens=False, return_tensors=None):
            ids = [ord(c) % 5000 for c in text]

            class R:
                input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
            return R()

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    for i in range(5):
        s = qa_sample(Tok(), i, 6000)
        text = Tok().decode(s.context_ids)
        import re
        people = set(re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+) (?:lives|owns|works|has a cat)", text))
        people |= set(re.findall(r"The locker of ([A-Z][a-z]+ [A-Z][a-z]+)", text))
        assert len(people) == 8
        assert len({p.split()[0] for p in people}) == 8 and len({p.split()[1] for p in people}) == 8


def test_committed_heldout_tables_match_their_csv():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "scripts" / "results_tables.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
