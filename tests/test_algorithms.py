"""Properties of the presses on plain tensors (kvpress 0.5.5 semantics)."""


import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import minikv
from minikv import LayerInputs, get_press, head_ceiling, n_kept, n_safe
from minikv.policies import adakv_keep_mask, projected_value_norm
from minikv.scorers import snapkv_scores

POLICY_NAMES = ["snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv",
                "knorm", "adakv_knorm", "streaming_llm", "random", "adakv_random", "critical_adakv_knorm"]


@st.composite
def layers(draw, min_len=2):
    b = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 4))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8]))
    w = draw(st.integers(1, 6))
    L = draw(st.integers(max(min_len, w + 1), 40))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, n_kv, L, d, generator=gen)
    values = torch.randn(b, n_kv, L, d, generator=gen)
    queries = torch.randn(b, n_kv * g, w, d, generator=gen)
    o_proj = torch.randn(3 * d, n_kv * g * d, generator=gen)
    return LayerInputs(keys, values, queries, o_proj), w


ratios = st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.875, 0.95])


def make(name, cr, w):
    kw = {"window_size": w} if name.endswith("snapkv") else {}
    return get_press(name, compression_ratio=cr, **kw)


@settings(max_examples=60, deadline=None)
@given(layers(), ratios, st.sampled_from(POLICY_NAMES))
def test_budget_conservation_and_valid_indices(layer, cr, name):
    x, w = layer
    sel = make(name, cr, w).select(x)
    L = x.context_length
    k = n_kept(L, cr) if cr > 0 else L
    assert sel.keep.shape == x.keys.shape[:3] and sel.keep.dtype == torch.bool
    # every row keeps exactly n_kv * n_kept (head, token) pairs, uniform or adaptive
    assert sel.counts.sum(-1).tolist() == [x.n_kv * k] * x.batch_size
    for r in range(x.batch_size):
        for h in range(x.n_kv):
            idx = sel.indices(r, h)
            assert len(set(idx.tolist())) == len(idx) and (idx >= 0).all() and (idx < L).all()


@settings(max_examples=60, deadline=None)
@given(layers(), ratios, st.sampled_from(["snapkv", "knorm", "critical_snapkv", "random"]))
def test_uniform_policies_keep_n_kept_per_head(layer, cr, name):
    x, w = layer
    sel = make(name, cr, w).select(x)
    k = n_kept(x.context_length, cr) if cr > 0 else x.context_length
    assert (sel.counts == k).all()


@settings(max_examples=80, deadline=None)
@given(layers(), ratios.filter(lambda r: r > 0), st.sampled_from(["adakv_snapkv", "critical_adakv_snapkv", "adakv_knorm"]),
       st.sampled_from([0.0, 0.2, 0.5, 1.0]))
def test_adaptive_floor_and_ceiling(layer, cr, name, alpha):
    x, w = layer
    press = make(name, cr, w)
    press.alpha_safeguard = alpha
    sel = press.select(x)
    L = x.context_length
    k = n_kept(L, cr)
    s = n_safe(k, alpha)
    assert sel.n_safe == s
    assert (sel.counts >= s).all(), f"a head fell under the safeguard floor {s}: {sel.counts.tolist()}"
    assert (sel.counts <= head_ceiling(k, s, x.n_kv, L)).all()
    if alpha == 1.0:  # the floor is the whole budget: AdaKV degenerates to uniform
        assert (sel.counts == k).all()


@settings(max_examples=60, deadline=None)
@given(layers(), ratios, st.sampled_from(["snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv"]))
def test_window_always_kept(layer, cr, name):
    x, w = layer
    sel = make(name, cr, w).select(x)
    k = n_kept(x.context_length, cr) if cr > 0 else x.context_length
    if k >= w:
        assert sel.keep[..., -w:].all(), "SnapKV's window tokens must always be kept when n_kept >= w"


@settings(max_examples=40, deadline=None)
@given(layers(), ratios, st.sampled_from(POLICY_NAMES))
def test_batch_rows_are_independent(layer, cr, name):
    x, w = layer
    if x.batch_size < 2:
        return
    full = make(name, cr, w).select(x).keep
    # random scores are seeded by each row's content, so every row keeps its tokens when computed alone
    for r in range(x.batch_size):
        one = LayerInputs(x.keys[r:r + 1], x.values[r:r + 1], x.queries[r:r + 1], x.o_proj)
        got = make(name, cr, w).select(one).keep
        if name.endswith("snapkv"):  # the window's score is max+1 of the whole batch: a tie of window tokens
            assert got[0].sum() == full[r].sum()
        assert torch.equal(got[0], full[r]), f"row {r} changed when computed alone"


@settings(max_examples=30, deadline=None)
@given(layers(), st.sampled_from(POLICY_NAMES))
def test_ratio_zero_keeps_everything(layer, name):
    x, w = layer
    assert make(name, 0.0, w).select(x).keep.all()


def test_kept_count_floor_rule():
    assert n_kept(90, 0.3) == 62  # 90 * 0.7 = 62.999... in floats
    assert n_kept(100, 0.5) == 50 and n_safe(50, 0.2) == 10
    assert n_kept(3, 0.9) == 1  # never zero
    assert n_safe(3, 0.2) == 1 and n_safe(50, 0.0) == 0


def test_adakv_is_global_topk_with_safeguard():
    # head 0 has all the large scores: without a safeguard it would take the whole budget
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.01, 0.02, 0.03]]])
    keep = adakv_keep_mask(scores, n_kept=3, alpha_safeguard=0.0)
    assert keep.sum(-1).tolist() == [[6, 0]]
    keep = adakv_keep_mask(scores, n_kept=3, alpha_safeguard=0.34)  # n_safe = 1
    assert keep.sum(-1).tolist() == [[5, 1]] and keep[0, 1, 2]  # head 1 keeps its best token (0.3)


def test_snapkv_scores_by_hand():
    # one head, d = 1, L = 4, window 1: the window query sees all 4 keys
    q = torch.tensor([[[[1.0]]]])
    k = torch.tensor([[[[0.0], [1.0], [2.0], [0.5]]]])
    s = snapkv_scores(q, k, window_size=1, kernel_size=1)
    attn = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 0.5]), 0)
    torch.testing.assert_close(s[0, 0, :3], attn[:3])
    assert s[0, 0, 3] == attn[:3].max() + 1
    # pooling with zero padding: edges are divided by the kernel size too
    s5 = snapkv_scores(q, k, window_size=1, kernel_size=3)
    torch.testing.assert_close(s5[0, 0, 0], (attn[0] + attn[1]) / 3)


def test_snapkv_window_is_causal():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 10, 8)
    base = snapkv_scores(q, k, window_size=4, kernel_size=1)
    k2 = k.clone()
    k2[..., -1, :] += 100.0  # the last token: only the last window row may see it
    changed = snapkv_scores(q, k2, window_size=4, kernel_size=1)
    # rows 0..2 of the window cannot see token 9, row 3 can: the scores change only through row 3
    from minikv.scorers import window_attention
    a, a2 = window_attention(q, k), window_attention(q, k2)
    torch.testing.assert_close(a[:, :, :3], a2[:, :, :3])
    assert not torch.allclose(a[:, :, 3], a2[:, :, 3])
    assert not torch.allclose(base, changed)


def test_projected_value_norm_by_hand():
    values = torch.randn(2, 2, 5, 3)
    o_proj = torch.randn(7, 4 * 3)  # H = 4, g = 2
    n = projected_value_norm(values, o_proj)
    for b in range(2):
        for k in range(2):
            for i in range(5):
                per_head = [(values[b, k, i] @ o_proj[:, h * 3:(h + 1) * 3].T).abs().sum() for h in (2 * k, 2 * k + 1)]
                torch.testing.assert_close(n[b, k, i], sum(per_head) / 2)


@pytest.mark.parametrize("max_elements", [1, 7 * 2 * 2 * 2, 10 ** 9])  # 1 token, 2 tokens, everything at once
def test_projected_value_norm_in_token_chunks(monkeypatch, max_elements):
    """Bounding the (b, n_kv, tokens, hidden) temporary changes nothing but memory."""
    import minikv.policies.critical as critical

    values = torch.randn(2, 2, 5, 3)
    o_proj = torch.randn(7, 4 * 3)
    whole = projected_value_norm(values, o_proj)
    monkeypatch.setattr(critical, "MAX_TEMP_ELEMENTS", max_elements)
    torch.testing.assert_close(critical.projected_value_norm(values, o_proj), whole, rtol=1e-6, atol=1e-6)


def test_critical_keeps_low_attention_token_with_large_value():
    """A token SnapKV ranks just below the cut, but whose value moves the output a lot."""
    torch.manual_seed(0)
    L, d, w = 20, 8, 4
    keys = torch.zeros(1, 1, L, d)
    q = torch.zeros(1, 1, w, d)
    q[..., 0] = 1.0
    keys[0, 0, :L - w, 0] = torch.linspace(2.0, 0.0, L - w)  # earlier tokens get more attention
    values = torch.full((1, 1, L, d), 0.1)
    critical_token = 9  # mid-ranked by attention
    values[0, 0, critical_token] = 50.0
    x = LayerInputs(keys, values, q, torch.eye(d))
    for name in ("snapkv", "adakv_snapkv"):
        assert not make(name, 0.6, w).select(x).keep[0, 0, critical_token]
    for name in ("critical_snapkv", "critical_adakv_snapkv"):
        assert make(name, 0.6, w).select(x).keep[0, 0, critical_token], name


def test_critical_adakv_budgets_match_adakv_per_row():
    torch.manual_seed(1)
    x = LayerInputs(torch.randn(3, 4, 50, 8), torch.randn(3, 4, 50, 8), torch.randn(3, 8, 8, 8), torch.randn(16, 64))
    a = make("adakv_snapkv", 0.5, 8).select(x).counts
    c = make("critical_adakv_snapkv", 0.5, 8).select(x).counts
    assert torch.equal(a, c)  # same budgets per (row, head), possibly different tokens
    assert len({tuple(r) for r in a.tolist()}) > 1  # rows really differ: budgets are per row


def test_demo_worked_example():
    from minikv.demo import demo_counts

    counts = demo_counts()
    assert counts["snapkv"] == [50, 50, 50, 50]
    ada = counts["adakv_snapkv"]
    assert sum(ada) == 200 and min(ada) >= 10 and len(set(ada)) > 1
    assert ada[0] > 50 > ada[3]  # the long-range head gains, the local head gives up budget


# ---- bad input: clear errors that name the argument ----

@pytest.mark.parametrize("cr", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(cr):
    with pytest.raises(ValueError, match=r"compression_ratio must be in \[0, 1\)"):
        get_press("snapkv", compression_ratio=cr)


def test_bad_window_and_kernel():
    x = LayerInputs(torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4), torch.randn(1, 1, 10, 4))
    with pytest.raises(ValueError, match="context length 10 <= window_size 64"):
        get_press("snapkv", 0.5).select(x)
    for k in (0, 4, -1):
        with pytest.raises(ValueError, match="kernel_size must be an odd integer >= 1"):
            minikv.SnapKV(kernel_size=k)


@pytest.mark.parametrize("alpha", [-0.1, 1.01])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=r"alpha_safeguard must be in \[0, 1\]"):
        minikv.AdaKV(minikv.SnapKV(), 0.5, alpha_safeguard=alpha)


def test_bad_shapes_and_groups():
    with pytest.raises(ValueError, match="values must match keys"):
        LayerInputs(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 9, 4))
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        LayerInputs(torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"keys must have shape \(b, n_kv, L, d\)"):
        LayerInputs(torch.randn(2, 10, 4), torch.randn(2, 10, 4))


def test_unknown_press_lists_known_ones():
    with pytest.raises(ValueError, match="known presses: no_press, .*adakv_snapkv"):
        get_press("adakv_snapvk")
    assert "adakv_knorm" in minikv.press_names() and "critical_adakv_streaming_llm" in minikv.press_names()


# ---- degenerate budgets: n_kept < SnapKV's window ----

def test_degenerate_budget_warns_with_both_numbers():
    gen = torch.Generator().manual_seed(0)
    x = LayerInputs(torch.randn(1, 2, 210, 8, generator=gen), torch.randn(1, 2, 210, 8, generator=gen),
                    torch.randn(1, 4, 64, 8, generator=gen))
    for name in ("snapkv", "adakv_snapkv"):
        with pytest.warns(minikv.scorers.DegenerateBudgetWarning, match=r"n_kept = 52 tokens per head < SnapKV window_size = 64"):
            get_press(name, 0.75).select(x)  # 210 tokens at ratio 0.75: 52 < 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n_kept = 105 >= 64: no warning
        get_press("adakv_snapkv", 0.5).select(x)


@settings(max_examples=60, deadline=None)
@given(layers(), ratios.filter(lambda r: r > 0), st.sampled_from(["snapkv", "adakv_snapkv"]))
def test_degenerate_budget_keeps_the_most_recent_window_tokens(layer, cr, name):
    """All window tokens tie at max + 1: minikv keeps the most recent ones, in every head (not topk's whim)."""
    x, w = layer
    k = n_kept(x.context_length, cr)
    if k >= w:
        return
    with pytest.warns(minikv.scorers.DegenerateBudgetWarning, match=rf"n_kept = {k} .* window_size = {w}"):
        keep = make(name, cr, w).select(x).keep
    want = torch.zeros_like(keep)
    want[..., -k:] = True
    assert torch.equal(keep, want)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.data())
def test_topk_ties_go_to_the_most_recent_token(values, data):
    from minikv.policies import topk_mask, topk_mask_per_head

    k = data.draw(st.integers(0, len(values)))
    scores = torch.tensor([values], dtype=torch.float32)
    # reference: sort by (score, position), both descending
    best = sorted(range(len(values)), key=lambda i: (values[i], i), reverse=True)[:k]
    want = torch.zeros(1, len(values), dtype=torch.bool)
    want[0, best] = True
    assert torch.equal(topk_mask(scores, k), want)
    assert torch.equal(topk_mask_per_head(scores[None], torch.tensor([[k]]))[0], want)


# ---- random press: a row's tokens do not depend on its place in the batch ----

@pytest.mark.parametrize("name", ["random", "adakv_random", "critical_random"])
def test_random_press_same_row_same_tokens_at_any_batch_position(name):
    gen = torch.Generator().manual_seed(3)
    b, n_kv, L, d = 4, 2, 30, 8
    keys, values = torch.randn(b, n_kv, L, d, generator=gen), torch.randn(b, n_kv, L, d, generator=gen)
    o_proj = torch.randn(16, 2 * n_kv * d, generator=gen)
    press = get_press(name, 0.5)
    batch = press.select(LayerInputs(keys, values, None, o_proj)).keep
    perm = torch.tensor([2, 0, 3, 1])
    permuted = press.select(LayerInputs(keys[perm], values[perm], None, o_proj)).keep
    for r in range(b):
        alone = press.select(LayerInputs(keys[r:r + 1], values[r:r + 1], None, o_proj)).keep[0]
        assert torch.equal(alone, batch[r]), f"row {r} alone != row {r} in the batch"
        assert torch.equal(alone, permuted[(perm == r).nonzero().item()]), f"row {r} changed when moved in the batch"
    # and the scores are really random: rows differ, another seed differs, the same seed repeats
    assert not torch.equal(batch[0], batch[1])
    other = get_press(name, 0.5, seed=1).select(LayerInputs(keys, values, None, o_proj)).keep
    assert not torch.equal(other, batch)
    assert torch.equal(get_press(name, 0.5).select(LayerInputs(keys, values, None, o_proj)).keep, batch)
