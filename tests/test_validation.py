"""Every input is checked where it enters: a clear error naming the argument, never a silent wrong answer.

Table tests for each bad input, and properties (hypothesis) for the ones with many variants:
a single NaN / inf anywhere, any wrong type or value of a scalar argument.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minikv
from minikv import AdaKV, CriticalAdaKV, CriticalKV, KNorm, LayerInputs, NoPress, SnapKV, StreamingLLM, Uniform, get_press
from minikv.budget import check_int, check_number, n_kept, n_safe
from minikv.scorers import RandomScorer, snapkv_scores


def layer(b=1, n_kv=2, g=2, L=40, d=8, w=8, hidden=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(keys=torch.randn(b, n_kv, L, d, generator=gen), values=torch.randn(b, n_kv, L, d, generator=gen),
                queries=torch.randn(b, n_kv * g, w, d, generator=gen),
                o_proj=torch.randn(hidden, n_kv * g * d, generator=gen))


# ---- LayerInputs: shapes, head counts, head dims, dtypes, devices, batch 0 -------------------------

def _with(**changes):
    x = layer()
    x.update(changes)
    return x


BAD_INPUTS = [  # (what, tensors, exception, message pattern naming the argument)
    ("keys not a tensor", _with(keys=[[1.0]]), TypeError, r"keys must be a torch.Tensor"),
    ("3-D keys", _with(keys=torch.randn(2, 40, 8)), ValueError, r"keys must have shape \(b, n_kv, L, d\)"),
    ("integer keys", _with(keys=torch.ones(1, 2, 40, 8, dtype=torch.long)), TypeError, r"keys must be a floating-point"),
    ("batch 0", _with(keys=torch.randn(0, 2, 40, 8), values=torch.randn(0, 2, 40, 8), queries=torch.randn(0, 4, 8, 8)),
     ValueError, r"b, n_kv, L, d >= 1"),
    ("empty context", _with(keys=torch.randn(1, 2, 0, 8), values=torch.randn(1, 2, 0, 8)), ValueError, r"b, n_kv, L, d >= 1"),
    ("values head dim", _with(values=torch.randn(1, 2, 40, 4)), ValueError, r"values must match keys in \(b, n_kv, L, d\)"),
    ("values length", _with(values=torch.randn(1, 2, 39, 8)), ValueError, r"values must match keys"),
    ("values dtype", _with(values=torch.randn(1, 2, 40, 8, dtype=torch.float64)), TypeError, r"values has dtype torch.float64"),
    ("3-D queries", _with(queries=torch.randn(4, 8, 8)), ValueError, r"queries must have shape \(b, H, w, d\)"),
    ("queries head dim", _with(queries=torch.randn(1, 4, 8, 4)), ValueError, r"queries .* must match keys .* in b and d"),
    ("queries batch", _with(queries=torch.randn(2, 4, 8, 8)), ValueError, r"queries .* must match keys .* in b and d"),
    ("queries groups", _with(queries=torch.randn(1, 3, 8, 8)), ValueError, r"multiple of the number of KV heads"),
    ("queries dtype", _with(queries=torch.randn(1, 4, 8, 8).double()), TypeError, r"queries has dtype torch.float64"),
    ("queries device", _with(queries=torch.randn(1, 4, 8, 8, device="meta")), ValueError, r"queries is on meta"),
    ("o_proj 1-D", _with(o_proj=torch.randn(64)), ValueError, r"o_proj must have shape \(hidden, H \* d\)"),
    ("o_proj heads", _with(o_proj=torch.randn(16, 3 * 8)), ValueError, r"o_proj must have shape \(hidden, H \* d\) = \(hidden, 4 \* 8\)"),
    ("o_proj head dim", _with(o_proj=torch.randn(16, 4 * 4)), ValueError, r"o_proj must have shape"),
    ("o_proj device", _with(o_proj=torch.randn(16, 32, device="meta")), ValueError, r"o_proj is on meta"),
    ("o_proj without queries", _with(queries=None, o_proj=torch.randn(16, 24)), ValueError, r"H a multiple of n_kv = 2"),
]


@pytest.mark.parametrize("what,tensors,exc,pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_layer_inputs_reject(what, tensors, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LayerInputs(**tensors)


def test_o_proj_may_have_another_dtype():
    """CriticalKV reads W_o in float32 anyway: a float64 weight with float32 keys is not an error."""
    x = layer()
    LayerInputs(x["keys"], x["values"], x["queries"], x["o_proj"].double())


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["keys", "values", "queries", "o_proj"]), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.integers(0, 10**6))
def test_one_non_finite_value_anywhere_is_an_error(name, bad, where):
    x = layer()
    t = x[name].clone()
    t.view(-1)[where % t.numel()] = bad
    x[name] = t
    with pytest.raises(ValueError, match=rf"^{name} contain NaN or inf"):
        LayerInputs(**x)


def test_snapkv_scores_refuse_non_finite_inputs_directly():
    """snapkv_scores on plain tensors (no LayerInputs): a NaN key would make every window score NaN."""
    x = layer()
    keys = x["keys"].clone()
    keys[0, 1, 5, 2] = math.nan
    with pytest.raises(ValueError, match="SnapKV scores are not finite"):
        snapkv_scores(x["queries"], keys, window_size=8)
    with pytest.raises(ValueError, match="share one dtype and one device"):
        snapkv_scores(x["queries"].to("meta"), x["keys"], window_size=8)
    with pytest.raises(ValueError, match=r"queries must be \(b, H, w, d\)"):
        snapkv_scores(x["queries"][0], x["keys"], window_size=8)


def test_scorer_output_is_checked():
    class Bad(KNorm):
        def __init__(self, out):
            self.out = out

        def score(self, inputs):
            return self.out

    x = LayerInputs(**layer())
    for out, pattern in [(torch.zeros(1, 2, 39), r"shape \(b, n_kv, L\) = \(1, 2, 40\)"),
                         (torch.full((1, 2, 40), math.nan), "NaN or inf scores"),
                         ("scores", r"got str")]:
        with pytest.raises(ValueError, match=pattern):
            Uniform(Bad(out), 0.5).select(x)


def test_select_takes_layer_inputs():
    with pytest.raises(TypeError, match="select\\(\\) takes a minikv LayerInputs, got dict"):
        get_press("knorm", 0.5).select(layer())


# ---- presses and scorers: every argument's type and range ----------------------------------------

BAD_ARGS = [  # (call, exception, pattern)
    (lambda: get_press(None), TypeError, r"press name must be a string, one of: no_press, .*adakv_snapkv"),
    (lambda: get_press(3, 0.5), TypeError, r"press name must be a string"),
    (lambda: get_press("snapvk", 0.5), ValueError, r"unknown press name 'snapvk'; known presses"),
    (lambda: get_press("no_press", 0.5), ValueError, r"no_press keeps every token, so its compression_ratio must be 0"),
    (lambda: get_press("no_press", window_size=8), TypeError, r"no_press takes no options"),
    (lambda: get_press("adakv_snapkv", 0.5, window=8), TypeError, r"unknown option\(s\) window; SnapKV takes .*window_size"),
    (lambda: get_press("snapkv", True), TypeError, r"compression_ratio must be a number"),
    (lambda: get_press("snapkv", "0.5"), TypeError, r"compression_ratio must be a number"),
    (lambda: AdaKV(None, 0.5), ValueError, r"AdaKV needs a scorer to compress at compression_ratio=0.5"),
    (lambda: CriticalKV(None, 0.25), ValueError, r"CriticalKV needs a scorer"),
    (lambda: Uniform("snapkv", 0.5), TypeError, r"scorer must be a minikv Scorer"),
    (lambda: NoPress(0.5), ValueError, r"compression_ratio must be 0"),
    (lambda: SnapKV(window_size=True), TypeError, r"window_size must be an integer >= 1, got True \(bool\)"),
    (lambda: SnapKV(window_size=-1), ValueError, r"window_size must be an integer >= 1, got -1"),
    (lambda: SnapKV(window_size=8.0), TypeError, r"window_size must be an integer"),
    (lambda: SnapKV(kernel_size=True), ValueError, r"kernel_size must be an odd integer"),
    (lambda: SnapKV(pooling="mean"), ValueError, r"pooling must be 'avg' or 'max'"),
    (lambda: StreamingLLM(n_sink=True), TypeError, r"n_sink must be an integer >= 0"),
    (lambda: StreamingLLM(n_sink=-2), ValueError, r"n_sink must be an integer >= 0"),
    (lambda: RandomScorer(seed=1.5), TypeError, r"seed must be an integer >= 0"),
    (lambda: AdaKV(SnapKV(), 0.5, alpha_safeguard=True), TypeError, r"alpha_safeguard must be a number"),
    (lambda: CriticalKV(SnapKV(), 0.5, epsilon=-1e-4), ValueError, r"epsilon must be a finite number >= 0"),
    (lambda: CriticalKV(SnapKV(), 0.5, epsilon=math.nan), ValueError, r"epsilon must be"),
    (lambda: CriticalAdaKV(SnapKV(), 0.5, first_stage_ratio=1.5), ValueError, r"first_stage_ratio must be a number in \[0, 1\]"),
    (lambda: CriticalAdaKV(SnapKV(), 0.5, first_stage_ratio="half"), TypeError, r"first_stage_ratio must be a number"),
    (lambda: n_kept(True, 0.5), TypeError, r"context_length must be an integer >= 1"),
    (lambda: n_kept(0, 0.5), ValueError, r"context_length must be an integer >= 1"),
    (lambda: n_safe(0, 0.2), ValueError, r"n_kept must be an integer >= 1"),
]


@pytest.mark.parametrize("i", range(len(BAD_ARGS)))
def test_bad_arguments(i):
    call, exc, pattern = BAD_ARGS[i]
    with pytest.raises(exc, match=pattern):
        call()


def test_a_press_without_scorer_is_fine_when_it_compresses_nothing():
    """minikv.exercises builds CriticalAdaKV(None, 0.0) to call keep_mask directly: no ratio is ignored there."""
    assert CriticalAdaKV(None, 0.0).scorer is None
    assert NoPress().select(LayerInputs(**layer())).keep.all()


def test_get_press_routes_options_to_scorer_and_policy():
    p = get_press("critical_adakv_snapkv", 0.5, window_size=16, alpha_safeguard=0.1, epsilon=1e-3)
    assert (p.scorer.window_size, p.alpha_safeguard, p.epsilon) == (16, 0.1, 1e-3)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.integers(-5, 0)))
def test_integer_arguments_refuse_everything_but_positive_ints(value):
    for make in (lambda v: SnapKV(window_size=v), lambda v: check_int("window_size", v, minimum=1)):
        with pytest.raises((TypeError, ValueError), match="window_size must be an integer >= 1"):
            make(value)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.booleans(), st.floats(), st.text(max_size=3), st.none()))
def test_fraction_arguments(value):
    ok = not isinstance(value, bool) and isinstance(value, float) and math.isfinite(value) and 0 <= value <= 1
    if ok:
        assert check_number("first_stage_ratio", value, lo=0, hi=1) == value
    else:
        with pytest.raises((TypeError, ValueError), match=r"first_stage_ratio must be a number in \[0, 1\]"):
            check_number("first_stage_ratio", value, lo=0, hi=1)


# ---- the model-facing entry points: prefill and generate -----------------------------------------

@pytest.mark.model
def test_generate_and_prefill_refuse_bad_arguments_before_any_work(smollm2, monkeypatch):
    import minikv.hf as hf

    model, tok = smollm2
    calls = []
    monkeypatch.setattr(hf, "apply_press", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    ctx, q = "The pass key is 12345. " * 20, "What is the pass key?"
    bad = [
        (dict(press="adakv_snapkv"), TypeError, r"press must be a minikv Press, got the string 'adakv_snapkv'.*get_press"),
        (dict(press=0.5), TypeError, r"press must be a minikv Press .* or None, got float"),
        (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be an integer >= 1, got 0"),
        (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an integer >= 1"),
        (dict(query_aware="yes"), TypeError, r"query_aware must be True or False"),
        (dict(context=[]), TypeError, r"context must be a string or a non-empty list of strings.*empty list"),
        (dict(context=None), TypeError, r"context must be a string"),
        (dict(question=[q, 3]), TypeError, r"question must be a string or a non-empty list"),
        (dict(context="word " * 9000), ValueError, r"the context \(9,\d{3} tokens\) \+ question .* positions, more than "
                                                   r"the model's max_position_embeddings = 8,192"),
    ]
    for change, exc, pattern in bad:
        kw = dict(context=ctx, question=q, press=get_press("snapkv", 0.5), max_new_tokens=4)
        kw.update(change)
        with pytest.raises(exc, match=pattern):
            minikv.generate(model, tok, **kw)
    for ids, pattern in [(torch.ones(0, 10, dtype=torch.long), r"shape \(b, L\) with b, L >= 1"),
                         (torch.ones(10, dtype=torch.long), r"integer tensor of token ids of shape \(b, L\)"),
                         (torch.ones(1, 10), r"integer tensor"),
                         (torch.ones(1, 8200, dtype=torch.long), r"input_ids has 8,200 tokens, more than .* 8,192")]:
        with pytest.raises(ValueError, match=pattern):
            hf.prefill(model, ids, get_press("snapkv", 0.5))
    with pytest.raises(ValueError, match="context length 20 <= window_size 64"):
        hf.prefill(model, torch.ones(1, 20, dtype=torch.long), get_press("snapkv", 0.5))
    assert not calls, "a bad argument reached the prefill"


# ---- honest bytes: held vs allocated ---------------------------------------------------------------

def _compressed_cache(device, L=1024, ratio=0.5, b=1, n_kv=3, d=64, n_layers=2):
    """A RaggedCache whose layers hold an AdaKV selection of random keys: -> (cache, selection)."""
    from minikv.cache import RaggedCache

    gen = torch.Generator().manual_seed(0)
    cache = RaggedCache()
    for i in range(n_layers):
        k, v = torch.randn(2, b, n_kv, L, d, generator=gen).to(device)
        cache.update(k, v, i)
        sel = get_press("adakv_knorm", ratio).select(LayerInputs(k, v))
        cache.compress_layer(i, sel)
    return cache, sel


def test_cpu_cache_allocated_equals_held():
    cache, sel = _compressed_cache("cpu")
    held = 2 * 2 * int(sel.counts.sum()) * 64 * 4  # layers x (K and V) x pairs x d x float32
    assert cache.nbytes() == held
    assert cache.allocated_nbytes() == cache.nbytes()
    assert cache.nbytes() == cache.full_nbytes() // 2  # ratio 0.5 of 1024: 512 per head on average


@pytest.mark.model
def test_generate_reports_held_and_allocated_bytes_on_cpu(smollm2):
    model, tok = smollm2
    res = minikv.generate(model, tok, "The pass key is 12345. " * 30, "What is the pass key?",
                          press=get_press("adakv_snapkv", 0.5), max_new_tokens=2)
    assert res.cache_allocated_nbytes == res.cache_nbytes > 0
    assert res.allocated_fraction == res.kept_fraction < 0.6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_cache_reports_the_flatstore_reserve():
    """On CUDA the FlatStore keeps free room per head for decoding: allocated > held, and both are reported."""
    cache, sel = _compressed_cache("cuda")
    store = cache.layers[0].store
    assert type(store).__name__ == "FlatStore"
    assert cache.allocated_nbytes() == sum(cache.layers[i].store.capacity_nbytes for i in range(2))
    assert cache.allocated_nbytes() > cache.nbytes()
    free = cache.allocated_nbytes() - cache.nbytes()
    assert free >= 2 * 2 * 3 * 64 * 4 * store.room  # at least `room` free slots per head, K and V, 2 layers
    print(f"1k tokens, ratio 0.5: held {cache.nbytes() / cache.full_nbytes():.1%}, "
          f"allocated {cache.allocated_nbytes() / cache.full_nbytes():.1%} of the full cache")
