"""The GPU path (minikv.gpu) against the slow float32 definition (minikv.gpu.reference).

The layout tests run anywhere (the layout is plain PyTorch); the Triton kernel tests need CUDA.
Errors are ||out - ref|| / ||ref|| on fresh random inputs, with the reference in float32 on
the same (upcast) inputs: fp32 kernels land near 1e-6, fp16 near 5e-4, bf16 near 4e-3.
"""

import pytest
import torch

from minikv.gpu import FlatStore, layout
from minikv.gpu.reference import append_segments, ragged_attention, segments_from_selection

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ragged_keep(b, n_kv, L, gen, device="cpu", extremes=False):
    """A keep mask whose heads keep very different numbers of tokens (at least 1 each)."""
    frac = torch.rand(b, n_kv, 1, generator=gen) ** 2  # many short heads, a few long ones
    keep = torch.rand(b, n_kv, L, generator=gen) < frac
    keep[..., -1] = True  # every head keeps its last token: length >= 1
    if extremes:
        keep[0, 0] = False
        keep[0, 0, L // 2] = True  # one head holds exactly one token
        keep[-1, -1] = True  # another holds all of them
    return keep.to(device)


def random_layer(b, n_kv, L, d, gen, dtype=torch.float32, device="cpu"):
    keys = torch.randn(b, n_kv, L, d, generator=gen).to(device, dtype)
    values = torch.randn(b, n_kv, L, d, generator=gen).to(device, dtype)
    return keys, values


# -- layout math: any device -------------------------------------------------------------------
def test_kept_positions_example():
    keep = torch.tensor([[[True, False, True], [False, True, False]]])
    src, pos = layout.kept_positions(keep, 3)
    assert src.tolist() == [0, 2, 4] and pos.tolist() == [0, 1, 0]


@pytest.mark.parametrize("seed", range(5))
def test_layout_holds_each_heads_tokens_in_order(seed):
    gen = torch.Generator().manual_seed(seed)
    b, n_kv, L, d, reserve = 3, 4, 37, 8, 5
    keys, values = random_layer(b, n_kv, L, d, gen)
    keep = ragged_keep(b, n_kv, L, gen, extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=reserve)
    assert store.lengths.tolist() == keep.sum(-1).tolist()
    assert store.k_flat.shape[0] == keep.sum() + reserve * b * n_kv
    starts = store.starts.reshape(b, n_kv)
    for r in range(b):
        for h in range(n_kv):
            n, s = int(keep[r, h].sum()), int(starts[r, h])
            assert torch.equal(store.k_flat[s:s + n], keys[r, h][keep[r, h]]), f"row {r} head {h}: keys"
            assert torch.equal(store.v_flat[s:s + n], values[r, h][keep[r, h]]), f"row {r} head {h}: values"
    k, v, valid = store.dense()
    assert torch.equal(valid.sum(-1), store.lengths)
    assert torch.equal(k[valid], keys[keep]) and torch.equal(v[valid], values[keep])
    assert not k[~valid].any(), "padding must be zero"
    row = d * keys.element_size()
    assert store.nbytes == 2 * int(keep.sum()) * row + 3 * b * n_kv * 8
    assert store.capacity_nbytes == 2 * store.k_flat.shape[0] * row + 3 * b * n_kv * 8


def test_append_in_place_then_relayout():
    gen = torch.Generator().manual_seed(1)
    b, n_kv, L, d = 2, 3, 20, 4
    keys, values = random_layer(b, n_kv, L, d, gen)
    keep = ragged_keep(b, n_kv, L, gen, extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=3)
    ks, vs = segments_from_selection(keys, values, keep)
    buffer = store.k_flat
    for step, q in enumerate([1, 2, 1, 4, 1]):
        nk, nv = random_layer(b, n_kv, q, d, gen)
        store.append(nk, nv)
        ks, vs = append_segments(ks, vs, nk, nv)
        if step < 2:  # 1 + 2 tokens fit in the reserve of 3: same buffer, nothing moved
            assert store.k_flat is buffer
        k, v, valid = store.dense()
        for r in range(b):
            for h in range(n_kv):
                n = len(ks[r][h])
                assert store.lengths[r, h] == n
                assert torch.equal(k[r, h, :n], ks[r][h]) and torch.equal(v[r, h, :n], vs[r][h]), f"step {step} row {r} head {h}"
    assert store.k_flat is not buffer  # the 4-token append outgrew the reserve
    assert store.n_total == int(store.lengths.sum()) and store.max_len == int(store.lengths.max())


@pytest.mark.parametrize("q", [1, 3])
def test_padded_attention_matches_reference(q):
    gen = torch.Generator().manual_seed(q)
    b, n_kv, g, L, d = 2, 3, 3, 30, 16
    keys, values = random_layer(b, n_kv, L, d, gen)
    keep = ragged_keep(b, n_kv, L, gen, extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=2)
    ks, vs = segments_from_selection(keys, values, keep)
    nk, nv = random_layer(b, n_kv, q, d, gen)
    store.append(nk, nv)
    ks, vs = append_segments(ks, vs, nk, nv)
    query = torch.randn(b, n_kv * g, q, d, generator=gen)
    out = store.attend(query, d ** -0.5, use_triton=False)
    assert rel_err(out, ragged_attention(query, ks, vs, d ** -0.5)) < 1e-5


def test_plan_splits_covers_the_longest_segment():
    for n_total, max_len in [(1, 1), (10_000, 9_000), (4_000_000, 131_072)]:
        chunk, splits = layout.plan_splits(n_total, max_len, 64, 1056)
        assert chunk % 64 == 0 and chunk * splits >= max_len and chunk * (splits - 1) < max_len


# -- the Triton kernel: CUDA only ------------------------------------------------------------
CASES = [  # b, n_kv, g, L, d
    (1, 1, 1, 1, 64),  # a single token
    (1, 3, 3, 4096, 64),  # SmolLM2's attention
    (4, 8, 4, 3000, 128),  # Llama-3.1-8B's attention, batch > 1
    (2, 2, 8, 20_000, 128),  # long segments: many splits
    (3, 4, 1, 777, 64),  # no GQA, odd length
]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_triton_decode_matches_reference(case, dtype):
    pytest.importorskip("triton")
    b, n_kv, g, L, d = case
    gen = torch.Generator().manual_seed(10 * CASES.index(case) + list(TOL).index(dtype))
    keys, values = random_layer(b, n_kv, L, d, gen, dtype, "cuda")
    keep = ragged_keep(b, n_kv, L, gen, "cuda", extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=4)
    ks, vs = segments_from_selection(keys, values, keep)
    for step in range(3):  # decode steps: append one token, attend
        nk, nv = random_layer(b, n_kv, 1, d, gen, dtype, "cuda")
        store.append(nk, nv)
        ks, vs = append_segments(ks, vs, nk, nv)
        query = (torch.randn(b, n_kv * g, 1, d, generator=gen) * 2).to("cuda", dtype)  # peaky softmax
        out = store.attend(query, d ** -0.5)
        assert out.shape == query.shape and out.dtype == dtype
        err = rel_err(out, ragged_attention(query, ks, vs, d ** -0.5))
        assert err < TOL[dtype], f"{case} {dtype} step {step}: rel err {err:.2e}"


@cuda
@pytest.mark.parametrize("block_n,num_warps,num_stages,programs", [(16, 4, 1, 1), (64, 4, 3, 7), (128, 8, 2, 5000)])
def test_triton_decode_any_tiling(block_n, num_warps, num_stages, programs):
    """The same answer whatever the tile size and however the segments are split."""
    pytest.importorskip("triton")
    from minikv.gpu.triton_decode import flat_decode_attention

    gen = torch.Generator().manual_seed(block_n + programs)
    b, n_kv, g, L, d = 2, 4, 4, 5000, 128
    keys, values = random_layer(b, n_kv, L, d, gen, torch.bfloat16, "cuda")
    keep = ragged_keep(b, n_kv, L, gen, "cuda", extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=0)
    query = torch.randn(b, n_kv * g, 1, d, generator=gen).to("cuda", torch.bfloat16)
    out = flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store._lengths, d ** -0.5,
                                store.n_total, store.max_len, block_n=block_n, num_warps=num_warps,
                                num_stages=num_stages, programs=programs)
    ks, vs = segments_from_selection(keys, values, keep)
    assert rel_err(out, ragged_attention(query, ks, vs, d ** -0.5)) < TOL[torch.bfloat16]


@cuda
@pytest.mark.parametrize("q", [2, 7])
def test_multi_token_append_on_gpu(q):
    gen = torch.Generator().manual_seed(q)
    b, n_kv, g, L, d = 2, 8, 4, 2000, 128
    keys, values = random_layer(b, n_kv, L, d, gen, torch.bfloat16, "cuda")
    keep = ragged_keep(b, n_kv, L, gen, "cuda", extremes=True)
    store = FlatStore.from_selection(keys, values, keep, reserve=4)  # q = 7 forces a re-layout
    ks, vs = segments_from_selection(keys, values, keep)
    nk, nv = random_layer(b, n_kv, q, d, gen, torch.bfloat16, "cuda")
    store.append(nk, nv)
    ks, vs = append_segments(ks, vs, nk, nv)
    query = torch.randn(b, n_kv * g, q, d, generator=gen).to("cuda", torch.bfloat16)
    out = store.attend(query, d ** -0.5)
    assert rel_err(out, ragged_attention(query, ks, vs, d ** -0.5)) < TOL[torch.bfloat16]


@cuda
def test_from_selection_on_gpu_equals_cpu():
    gen = torch.Generator().manual_seed(0)
    keys, values = random_layer(2, 8, 4096, 128, gen)
    keep = ragged_keep(2, 8, 4096, gen, extremes=True)
    cpu = FlatStore.from_selection(keys, values, keep)
    gpu = FlatStore.from_selection(keys.cuda(), values.cuda(), keep.cuda())
    kc, vc, valid_c = cpu.dense()
    kg, vg, valid_g = gpu.dense()
    assert torch.equal(valid_g.cpu(), valid_c) and torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)
    assert gpu.nbytes == cpu.nbytes


def test_imports_without_triton():
    """The GPU package must import (and build layouts) on a machine without Triton."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, minikv.gpu as g\n"
            "from minikv.gpu import bench, layout, plots, reference\n"
            "s = g.FlatStore.from_selection(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.ones(1, 2, 5, dtype=torch.bool))\n"
            "assert s.attend(torch.randn(1, 4, 1, 4), 0.5).shape == (1, 4, 1, 4)\n")
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
