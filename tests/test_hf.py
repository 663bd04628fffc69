"""minikv on the real model (SmolLM2-135M-Instruct, CPU, float32): real eviction, kvpress pipeline semantics."""

import pytest
import torch

import minikv
from minikv.hf import cache_kwarg, split_chat_template
from masked_reference import masked_reference_logits, spy_queries

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def haystack(n_repeats=25, key="71432", depth=0.5):
    before = FILLER * int(n_repeats * depth)
    after = FILLER * (n_repeats - int(n_repeats * depth))
    return before + f"The pass key is {key}. Remember it. {key} is the pass key. " + after


QUESTION = "What is the pass key?"
PRESSES = ["snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv", "knorm", "adakv_knorm",
           "streaming_llm", "random"]


def prefill(model, ids, press):
    return minikv.hf.prefill(model, ids, press)[0]


@pytest.mark.model
def test_no_press_matches_transformers_greedy(smollm2):
    model, tok = smollm2
    ctx = haystack(8)
    for press in (minikv.get_press("no_press"), minikv.get_press("adakv_snapkv", 0.0)):
        res = minikv.generate(model, tok, ctx, QUESTION, press=press, max_new_tokens=8)
        c, q = split_chat_template(tok, ctx, QUESTION)
        ids = torch.cat([c, q], dim=1)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        ref = ref[0, ids.shape[1]:].tolist()
        got = res.token_ids[0].tolist()
        assert got == ref[: len(got)], f"{press}: minikv {got} vs transformers {ref}"
        assert res.kept_counts.unique().tolist() == [res.context_length]


@pytest.mark.model
@pytest.mark.parametrize("name", PRESSES)
def test_ragged_attention_equals_masked_dense(smollm2, name):
    model, tok = smollm2
    ctx_ids, q_ids = split_chat_template(tok, haystack(4), QUESTION)
    press = minikv.get_press(name, 0.5)
    with torch.no_grad():
        cache = prefill(model, ctx_ids, press)
        ragged = model(input_ids=q_ids, use_cache=True, **{cache_kwarg(model): cache}).logits
        ref = masked_reference_logits(model, ctx_ids, q_ids, cache.selections)
    assert len(cache.selections) == model.config.num_hidden_layers
    torch.testing.assert_close(ragged, ref, atol=1e-4, rtol=0)


@pytest.mark.model
@pytest.mark.parametrize("name", ["snapkv", "adakv_snapkv", "critical_adakv_snapkv"])
@pytest.mark.parametrize("cr", [0.25, 0.75])
def test_kept_counts_and_bytes_on_the_real_model(smollm2, name, cr):
    model, tok = smollm2
    ctx_ids, _ = split_chat_template(tok, haystack(10), QUESTION)
    L = ctx_ids.shape[1]
    cache = prefill(model, ctx_ids, minikv.get_press(name, cr))
    counts = cache.kept_counts()  # (layers, 1, 3)
    k = minikv.n_kept(L, cr)
    assert (counts.sum(-1) == 3 * k).all(), "every layer keeps n_kv * n_kept pairs"
    if name.startswith(("adakv", "critical_adakv")):
        assert (counts >= minikv.n_safe(k, 0.2)).all()
        assert (counts != k).any(), "AdaKV should give heads of a real model different budgets"
    else:
        assert (counts == k).all()
    # bytes: sum over heads of kept tokens x head dim x 2 (K and V) x 4 bytes (float32)
    assert cache.nbytes() == int(counts.sum()) * 64 * 2 * 4
    assert cache.full_nbytes() == model.config.num_hidden_layers * 3 * L * 64 * 2 * 4
    # AdaKV's cache is as small as SnapKV's: kvpress's masking would keep full_nbytes
    assert cache.nbytes() == pytest.approx((k / L) * cache.full_nbytes(), rel=1e-9)


@pytest.mark.model
def test_decoding_appends_one_token_per_head(smollm2):
    model, tok = smollm2
    res = minikv.generate(model, tok, haystack(10), QUESTION, press=minikv.get_press("adakv_snapkv", 0.5),
                          max_new_tokens=4, return_logprobs=True)
    assert len(res.logprobs) == res.token_ids.shape[1]
    lp = res.logprobs[0]
    assert lp.shape[-1] == model.config.vocab_size and torch.allclose(lp.exp().sum(-1), torch.ones(1), atol=1e-4)
    assert res.cache_nbytes < 0.55 * res.full_cache_nbytes


@pytest.mark.model
def test_batch_rows_match_single_rows(smollm2):
    model, tok = smollm2
    ctxs = [haystack(5, key="11111"), haystack(5, key="22222")]
    press = minikv.get_press("critical_adakv_snapkv", 0.5)
    both = minikv.generate(model, tok, ctxs, QUESTION, press=press, max_new_tokens=3, return_logprobs=True)
    for r, ctx in enumerate(ctxs):
        one = minikv.generate(model, tok, ctx, QUESTION, press=press, max_new_tokens=3, return_logprobs=True)
        assert torch.equal(both.kept_counts[:, r], one.kept_counts[:, 0])
        torch.testing.assert_close(both.logprobs[0][r], one.logprobs[0][0], atol=1e-4, rtol=0)


@pytest.mark.model
def test_bad_inputs_on_the_model(smollm2):
    model, tok = smollm2
    with pytest.raises(ValueError, match="window_size 64"):
        minikv.generate(model, tok, "Too short.", QUESTION, press=minikv.get_press("snapkv", 0.5))
    with pytest.raises(ValueError, match="unknown press name"):
        minikv.get_press("snap_kv", 0.5)
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        minikv.get_press("adakv_snapkv", 1.2)
    with pytest.raises(ValueError, match="different context lengths"):
        minikv.generate(model, tok, [haystack(8), haystack(9)], QUESTION, press=minikv.get_press("snapkv", 0.5))


@pytest.mark.model
def test_ragged_layer_refuses_unattached_attention(smollm2):
    model, tok = smollm2
    ctx_ids, q_ids = split_chat_template(tok, haystack(8), QUESTION)
    cache = prefill(model, ctx_ids, minikv.get_press("adakv_snapkv", 0.5))
    with pytest.raises(RuntimeError, match="ragged"):
        cache.update(torch.zeros(1, 3, 1, 64), torch.zeros(1, 3, 1, 64), 0)


@pytest.mark.model
def test_capture_layers_gives_what_the_press_sees(smollm2):
    """Scoring the captured inputs by hand selects exactly what compression inside the model selected."""
    model, tok = smollm2
    from minikv.hf import capture_layers

    ctx_ids, _ = split_chat_template(tok, haystack(4), QUESTION)
    press = minikv.get_press("adakv_snapkv", 0.5)
    captured = capture_layers(model, ctx_ids, n_queries=64, layers=[0, 17])
    cache = prefill(model, ctx_ids, press)
    for i, inputs in captured.items():
        assert inputs.keys.shape == (1, 3, ctx_ids.shape[1], 64) and inputs.queries.shape == (1, 9, 64, 64)
        assert torch.equal(press.select(inputs).keep, cache.selections[i].keep)


@pytest.mark.model
def test_window_queries_are_the_models_own_queries(smollm2):
    """SnapKV's recomputed window queries (q_proj + RoPE at true positions) equal the queries attention used."""
    from minikv.hf import capture_layers

    model, tok = smollm2
    ctx_ids, _ = split_chat_template(tok, haystack(3), QUESTION)
    seen = spy_queries(model, ctx_ids)
    captured = capture_layers(model, ctx_ids, n_queries=64, layers=[0, 29])
    for i, inputs in captured.items():
        query, scaling = seen[i]
        assert scaling == 64**-0.5  # SmolLM2's 1/sqrt(d): the window queries are not rescaled
        torch.testing.assert_close(inputs.queries, query[:, :, -64:], atol=1e-5, rtol=1e-5)
