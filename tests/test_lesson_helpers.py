"""minikv.fidelity's lesson helpers (end of the module): split one capture into what a press sees and
the held-out queries, and extend a keep mask over the uncompressed continuation."""

import pytest
import torch

from minikv import SnapKV, Uniform
from minikv.fidelity import causal_attention, keep_through, split_capture
from minikv.scorers.base import LayerInputs


def capture(T=40, m=14, n_kv=2, H=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LayerInputs(torch.randn(1, n_kv, T, d, generator=g), torch.randn(1, n_kv, T, d, generator=g),
                       torch.randn(1, H, m, d, generator=g), torch.randn(16, H * d, generator=g))


def test_split_gives_the_press_view_and_the_future_queries():
    li = capture(T=40, m=14)  # window 6 + 8 later tokens: context = 32
    view, future = split_capture(li, n_context=32, window=6)
    assert view.keys.shape[2] == view.values.shape[2] == 32
    assert torch.equal(view.queries, li.queries[:, :, :6]) and torch.equal(future, li.queries[:, :, 6:])
    assert view.o_proj is li.o_proj
    # causality: the window queries see the same attention in the view as in the whole capture
    a_view = causal_attention(view.queries, view.keys, 32 - 6)  # (1, H, 6, 32)
    a_all = causal_attention(li.queries[:, :, :6], li.keys, 32 - 6)  # (1, H, 6, 40)
    assert torch.allclose(a_view, a_all[..., :32]) and a_all[..., 32:].eq(0).all()
    # a press runs on the view as on any LayerInputs
    assert Uniform(SnapKV(window_size=6, kernel_size=1), 0.5).select(view).counts.tolist() == [[16, 16]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_context=30, window=6), r"needs window \+ T - n_context = 6 \+ 40 - 30 = 16"),
    (dict(n_context=40, window=6), r"n_context must be an int in \[1, 39\]"),
    (dict(n_context=32, window=0), r"window must be an int in \[1, n_context = 32\]"),
    (dict(n_context=32.0, window=6), r"n_context must be an int"),
])
def test_split_names_the_bad_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_capture(capture(T=40, m=14), **kwargs)


def test_split_needs_queries():
    li = capture()
    with pytest.raises(ValueError, match="needs the layer's queries"):
        split_capture(LayerInputs(li.keys, li.values), n_context=32, window=6)


def test_keep_through_keeps_everything_after_the_context():
    keep = torch.rand(2, 3, 10) > 0.5
    out = keep_through(keep, 15)
    assert out.shape == (2, 3, 15) and torch.equal(out[..., :10], keep) and out[..., 10:].all()
    assert torch.equal(keep_through(keep, 10), keep)
    with pytest.raises(ValueError, match="length must be an int >= the mask's 10 context tokens"):
        keep_through(keep, 9)


def test_head_outputs_equals_attention_times_projected_values():
    from minikv.fidelity import head_outputs, projected_values

    li = capture(T=40, m=14)
    a = causal_attention(li.queries, li.keys, 40 - 14, keep=torch.rand(1, 2, 40) > 0.3)  # (1, H, 14, 40)
    o = head_outputs(a, li.values, li.o_proj)
    assert o.shape == (1, 4, 14, 16)
    assert torch.allclose(o, a @ projected_values(li.values, li.o_proj), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not fit together"):
        head_outputs(a[..., :30], li.values, li.o_proj)
