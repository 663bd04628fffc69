"""The PyTorch twin of the Triton decode kernel (minikv.gpu.twin) computes ragged attention exactly.

It runs on the CPU, so this is where CI checks the kernel's *algorithm*: split-K over each segment,
online softmax per tile, log-sum-exp merge, on the flat layout. The float32 twin lands near 1e-7 of
the float32 reference; the tolerance (2e-6) is far below what a wrong rescaling or merge gives (> 1e-2,
checked below). With Triton installed the real kernel is compared too: on CUDA, or on the CPU under
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess).
"""

import ast
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minikv.gpu import FlatStore, layout, twin
from minikv.gpu.reference import append_segments, ragged_attention, segments_from_selection

TOL = 2e-6  # relative error, float32


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "NaN or inf in the output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def ragged_layer(b, n_kv, G, L, d, seed, reserve=3, appended=1, scale=1.0):
    """A FlatStore with very uneven heads (one of 1 token, one of all L) after `appended` decode steps,
    the same cache as nested lists, and a query. Returns (store, ks, vs, query)."""
    gen = torch.Generator().manual_seed(seed)
    keys = scale * torch.randn(b, n_kv, L, d, generator=gen)
    values = torch.randn(b, n_kv, L, d, generator=gen)
    keep = torch.rand(b, n_kv, L, generator=gen) < torch.rand(b, n_kv, 1, generator=gen) ** 2
    keep[..., -1] = True
    keep[0, 0] = False
    keep[0, 0, L // 2] = True  # a head holding one token (before the appends)
    keep[-1, -1] = True  # a head holding every token
    store = FlatStore.from_selection(keys, values, keep, reserve=reserve)
    ks, vs = segments_from_selection(keys, values, keep)
    for _ in range(appended):  # appends leave gaps (the reserve) between segments
        nk, nv = scale * torch.randn(b, n_kv, 1, d, generator=gen), torch.randn(b, n_kv, 1, d, generator=gen)
        store.append(nk, nv)
        ks, vs = append_segments(ks, vs, nk, nv)
    query = torch.randn(b, n_kv * G, 1, d, generator=gen)
    return store, ks, vs, query


def dense_masked(store, query, scaling):
    """Plain attention over the cache padded to its longest head, padding masked: a second, independent oracle."""
    keys, values, valid = store.dense()  # (b, n_kv, Lmax, d), (b, n_kv, Lmax)
    b, H, _, d = query.shape
    G = H // store.n_kv
    qg = query.reshape(b, store.n_kv, G, d)
    logits = (qg @ keys.transpose(-1, -2)) * scaling  # (b, n_kv, G, Lmax)
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ values).reshape(b, H, 1, d)


CASES = [  # b, n_kv, G, L, d, block_n, programs
    (1, 1, 1, 1, 4, 128, 64),  # a single 1-token segment
    (1, 2, 7, 40, 8, 4, 64),  # G = 7: G_PAD = 16, 9 padded query rows
    (2, 3, 3, 60, 16, 4, 8),
    (3, 2, 5, 33, 12, 2, 100),  # d not a power of two; many tiny chunks
    (2, 4, 2, 80, 16, 8, 5),
    (1, 3, 4, 200, 16, 16, 64),
    (2, 1, 6, 50, 8, 4, 1),  # programs = 1: one chunk per segment, walked in many tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_nkv{}_g{}_L{}_d{}_bn{}_p{}".format(*c))
@pytest.mark.parametrize("seed", [0, 1])
def test_twin_equals_reference(case, seed):
    b, n_kv, G, L, d, block_n, programs = case
    store, ks, vs, query = ragged_layer(b, n_kv, G, L, d, seed)
    out = twin.attend(store, query, d ** -0.5, block_n=block_n, programs=programs)
    assert out.shape == query.shape and out.dtype == query.dtype
    assert rel_err(out, ragged_attention(query, ks, vs, d ** -0.5)) < TOL
    assert rel_err(out, dense_masked(store, query, d ** -0.5)) < TOL


@pytest.mark.parametrize("G", range(1, 8))
def test_every_gqa_group_size(G):
    store, ks, vs, query = ragged_layer(2, 2, G, 30, 8, seed=10 + G)
    out = twin.attend(store, query, 8 ** -0.5, block_n=4, programs=16)
    assert rel_err(out, ragged_attention(query, ks, vs, 8 ** -0.5)) < TOL


def parts(store, query, block_n, programs, **kw):
    d = query.shape[-1]
    return twin.decode_parts(query, store.k_flat, store.v_flat, store.starts, store.lengths.reshape(-1), d ** -0.5,
                             store.n_total, store.max_len, block_n, programs, **kw)


def test_several_splits_and_tiles_are_exercised():
    """Segments really are cut into several chunks of several tiles, and short ones into one (no merge)."""
    store, ks, vs, query = ragged_layer(2, 3, 3, 120, 16, seed=3)
    chunk, num_splits = layout.plan_splits(store.n_total, store.max_len, 4, 12)
    assert num_splits >= 4 and chunk >= 2 * 4, (chunk, num_splits)
    out, out_part, lse_part, c2, s2 = parts(store, query, 4, 12)
    assert (c2, s2) == (chunk, num_splits)
    used = -(-store.lengths.reshape(-1) // chunk)  # chunks holding tokens, per segment
    assert used.max() == num_splits and (used == 1).any()  # long heads use every chunk, short ones a single one
    for seg, n_used in enumerate(used.tolist()):
        wrote = torch.isfinite(lse_part[seg]).all(-1)  # (num_splits,) chunks that wrote a partial
        expect = torch.arange(num_splits) < n_used if n_used > 1 else torch.zeros(num_splits, dtype=torch.bool)
        assert torch.equal(wrote, expect), f"segment {seg} ({n_used} chunks): partials written {wrote.tolist()}"
    assert rel_err(out, ragged_attention(query, ks, vs, 16 ** -0.5)) < TOL


def test_many_chunks_per_segment():
    """More chunks than the merge reads at once (SPLIT_BLOCK): its outer loop runs several rounds."""
    store, ks, vs, query = ragged_layer(1, 2, 3, 100, 8, seed=11)
    out, _, _, chunk, num_splits = parts(store, query, 2, 1000)
    assert chunk == 2 and num_splits > 2 * twin.SPLIT_BLOCK
    assert rel_err(out, ragged_attention(query, ks, vs, 8 ** -0.5)) < TOL


def test_each_chunk_is_its_own_softmax():
    """out_part[s, j] = softmax over chunk j's tokens only; lse_part[s, j] = log2 of that chunk's mass."""
    d = 8
    store, _, _, query = ragged_layer(1, 2, 3, 50, d, seed=4)
    scaling = d ** -0.5
    out, out_part, lse_part, chunk, _ = parts(store, query, 4, 8)
    q = query.reshape(2, 3, d)
    checked = 0
    for seg in range(2):
        start, n = int(store.starts[seg]), int(store.lengths.reshape(-1)[seg])
        if n <= chunk:
            continue  # one chunk: written straight to the output
        for j in range(-(-n // chunk)):
            rows = slice(start + j * chunk, start + min((j + 1) * chunk, n))
            logits = q[seg] @ store.k_flat[rows].T * scaling  # (G, tokens of the chunk)
            expect_out = torch.softmax(logits, -1) @ store.v_flat[rows]
            expect_lse = torch.logsumexp(logits, -1) * twin.LOG2E  # natural -> base 2
            assert torch.allclose(out_part[seg, j], expect_out, atol=1e-6, rtol=1e-5), (seg, j)
            assert torch.allclose(lse_part[seg, j], expect_lse, atol=1e-5, rtol=1e-6), (seg, j)
            checked += 1
    assert checked >= 4


def test_a_wrong_merge_is_caught():
    """Averaging the chunks' outputs (ignoring their softmax mass) is far outside the tolerance;
    the right merge, written with torch.logsumexp, equals the kernel's running one."""
    d = 16
    store, ks, vs, query = ragged_layer(2, 3, 3, 120, d, seed=5)
    out, out_part, lse_part, chunk, _ = parts(store, query, 4, 12)
    ref = ragged_attention(query, ks, vs, d ** -0.5)
    used = (-(-store.lengths.reshape(-1) // chunk)).tolist()
    S, G = len(used), out_part.shape[2]
    direct = out.reshape(S, G, d)  # one-chunk segments: the kernel's own output
    naive = torch.stack([out_part[s, :n].mean(0) if n > 1 else direct[s] for s, n in enumerate(used)])
    lse = [torch.logsumexp(lse_part[s, :n] / twin.LOG2E, 0) * twin.LOG2E for s, n in enumerate(used)]
    merged = torch.stack([(torch.exp2(lse_part[s, :n] - lse[s])[..., None] * out_part[s, :n]).sum(0) if n > 1
                          else direct[s] for s, n in enumerate(used)])
    assert rel_err(out, ref) < TOL
    assert rel_err(merged.reshape(ref.shape), ref) < TOL
    assert rel_err(naive.reshape(ref.shape), ref) > 1e3 * TOL


@pytest.mark.parametrize("fused", [True, False])
def test_program_order_and_merge_variant_do_not_matter(fused):
    """The GPU runs programs in any order; whichever chunk finishes last merges. Same bits either way."""
    store, _, _, query = ragged_layer(2, 3, 3, 120, 16, seed=12)
    base = parts(store, query, 4, 12)[0]
    for seed in range(3):
        out = parts(store, query, 4, 12, fused=fused, order=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(out, base), f"fused={fused}, program order seed {seed}"


def test_an_empty_segment_gives_zeros():
    """The kernel defines an empty segment's output as 0 (reference: softmax over nothing @ nothing = 0)."""
    gen = torch.Generator().manual_seed(13)
    keys, values = torch.randn(1, 3, 10, 8, generator=gen), torch.randn(1, 3, 10, 8, generator=gen)
    keep = torch.rand(1, 3, 10, generator=gen) < 0.5
    keep[0, 1] = False
    keep[0, 0, 0] = keep[0, 2, 0] = True
    store = FlatStore.from_selection(keys, values, keep, reserve=2)
    query = torch.randn(1, 6, 1, 8, generator=gen)
    out = twin.attend(store, query, 8 ** -0.5, block_n=2, programs=8)
    ks, vs = segments_from_selection(keys, values, keep)
    assert torch.equal(out[0, 2:4], torch.zeros(2, 1, 8))
    assert rel_err(out, ragged_attention(query, ks, vs, 8 ** -0.5)) < TOL


def test_huge_logits_stay_finite():
    """Keys scaled by 60: logits reach ~150 and exp(logit) overflows float32; the running max keeps every exp2 <= 1."""
    d = 8
    store, ks, vs, query = ragged_layer(2, 2, 3, 40, d, seed=6, scale=60.0)
    biggest = max((query[r, h].float() @ ks[r][h // 3].T).max().item() * d ** -0.5 for r in range(2) for h in range(6))
    assert torch.isinf(torch.exp(torch.tensor(biggest))), "the case must overflow a plain exp"
    out = twin.attend(store, query, d ** -0.5, block_n=4, programs=16)
    ref = ragged_attention(query, ks, vs, d ** -0.5)
    assert rel_err(out, ref) < 1e-5  # logits of ~150 carry ~1e-5 of float32 rounding, whatever the order of the sums


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 1.5e-2)])
def test_half_precision_inputs(dtype, tol):
    d = 16
    store, ks, vs, query = ragged_layer(2, 2, 4, 60, d, seed=7)
    half = FlatStore(store.k_flat.to(dtype), store.v_flat.to(dtype), store.starts, store.lengths.reshape(-1),
                     store.capacity, store.b, store.n_kv, store.n_total, store.max_len, store.room, store.reserve)
    q = query.to(dtype)
    out = twin.attend(half, q, d ** -0.5, block_n=8, programs=8)
    assert out.dtype == dtype
    up = lambda nested: [[t.to(dtype).float() for t in row] for row in nested]
    assert rel_err(out, ragged_attention(q.float(), up(ks), up(vs), d ** -0.5)) < tol


@pytest.mark.parametrize("bad, word", [
    (dict(query=torch.randn(1, 3, 2, 4)), "query"),  # two new tokens: not a decode step
    (dict(query=torch.randn(1, 4, 1, 4)), "n_kv"),  # 4 query heads over 3 KV heads
    (dict(lengths=torch.tensor([2, -1, 1])), "lengths"),
    (dict(k_flat=torch.randn(9, 5)), "k_flat"),
    (dict(block_n=0), "block_n"),
])
def test_bad_input_is_named(bad, word):
    args = dict(query=torch.randn(1, 3, 1, 4), k_flat=torch.randn(9, 4), v_flat=torch.randn(9, 4),
                starts=torch.tensor([0, 3, 6]), lengths=torch.tensor([2, 1, 1]), scaling=0.5, n_total=4, max_len=2)
    args.update(bad)
    with pytest.raises(ValueError, match=word):
        twin.flat_decode_attention(**args)


# -- the twin stays the kernel's twin -------------------------------------------------------------------
@pytest.mark.parametrize("kernel, mine", [("_split_kernel", twin.split_kernel), ("_merge_chunks", twin.merge_chunks),
                                          ("_merge_kernel", twin.merge_kernel)])
def test_twin_uses_the_kernels_names(kernel, mine):
    """Every argument and variable of the Triton program has a namesake in the twin (so they read side by side)."""
    theirs = twin.assigned_names(twin.kernel_functions()[kernel])
    ours = twin.assigned_names(ast.parse(textwrap.dedent(inspect.getsource(mine))).body[0])
    missing = theirs - ours
    assert not missing, f"triton_decode.{kernel} has {sorted(missing)} that minikv/gpu/twin.py does not: update the twin"


def test_twin_uses_the_kernels_constants():
    assert twin.SPLIT_BLOCK == twin.kernel_constant("SPLIT_BLOCK")
    assert twin.LOG2E == twin.kernel_constant("LOG2E")


def test_kernel_source_of_other_files():
    src = twin.kernel_source("_linear_kernel", "triton_linear.py")
    assert src.startswith("@triton.jit") and "gdc_begin(GDC)" in src and "_prefetch_l2(ptrs)" in src
    assert src.index("_prefetch_l2(ptrs)") < src.index("gdc_begin(GDC)") < src.index("tl.dot")  # prefetch, wait, compute
    for bad in ("../hf.py", "nope.py", "", "layout", None):
        with pytest.raises(ValueError, match="file must be a Python file of minikv/gpu"):
            twin.kernel_source("_linear_kernel", bad)
    with pytest.raises(ValueError, match="one of"):
        twin.kernel_source("_split_kernel", "triton_linear.py")


def test_kernel_source_is_read_without_triton():
    src = twin.kernel_source("_split_kernel")
    assert src.startswith("@triton.jit") and "def _split_kernel(" in src and "tl.store(LsePart" in src
    with pytest.raises(ValueError, match="one of"):
        twin.kernel_source("no_such_kernel")


INTERPRETED = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_gpu_twin import ragged_layer
from minikv.gpu import twin
from minikv.gpu.triton_decode import flat_decode_attention
errs = []
for b, n_kv, G, L, d, block_n, programs, dtype in [(2, 3, 3, 60, 16, 16, 8, torch.float32), (1, 2, 7, 200, 32, 16, 12, torch.float32),
                                                   (2, 2, 4, 90, 16, 16, 64, torch.float16)]:
    store, _, _, q = ragged_layer(b, n_kv, G, L, d, seed=8)
    k, v, q = store.k_flat.to(dtype), store.v_flat.to(dtype), q.to(dtype)
    args = (q, k, v, store.starts, store.lengths.reshape(-1), d ** -0.5, store.n_total, store.max_len)
    try:
        real = flat_decode_attention(*args, block_n=block_n, programs=programs).float()
    except Exception as e:  # an interpreter that cannot run the kernel says so; the twin is not at fault
        print(json.dumps(dict(cannot_run=repr(e)[:300])))
        raise SystemExit(0)
    mine = twin.flat_decode_attention(*args, block_n=block_n, programs=programs).float()
    errs.append((real - mine).abs().max().item())
print(json.dumps(errs))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (not a minikv dependency)")
def test_twin_equals_the_real_kernel_interpreted():
    """The real Triton kernel, run on the CPU by Triton's interpreter, gives the twin's numbers."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = INTERPRETED.format(tests=os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errs = json.loads(run.stdout.strip().splitlines()[-1])
    if isinstance(errs, dict):
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernel: {errs['cannot_run']}")
    assert max(errs[:2]) < 1e-6, f"float32: max |real - twin| = {errs[:2]}"
    assert errs[2] < 1e-3, f"float16: max |real - twin| = {errs[2]}"


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and Triton")
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("fused", [True, False])
def test_twin_equals_the_real_kernel_on_cuda(d, dtype, tol, fused):
    """Same inputs, same tiling: the GPU kernel (programs truly in parallel, atomics and all) and the twin agree."""
    from minikv.gpu.triton_decode import flat_decode_attention

    store, _, _, query = ragged_layer(2, 3, 3, 300, d, seed=9)
    k, v, q = store.k_flat.to(dtype), store.v_flat.to(dtype), query.to(dtype)
    host = (store.starts, store.lengths.reshape(-1))
    sizes = dict(scaling=d ** -0.5, n_total=store.n_total, max_len=store.max_len, block_n=32, programs=16, fused=fused)
    mine = twin.flat_decode_attention(q, k, v, *host, **sizes)
    real = flat_decode_attention(q.cuda(), k.cuda(), v.cuda(), *(t.cuda() for t in host), **sizes)
    assert rel_err(real.cpu(), mine) < tol


@pytest.mark.parametrize("fused", [True, False])
def test_pending_counts_the_token_written_past_each_length(fused):
    """pending=1 (the decoder's ops="fused": k, v written before the lengths move on) = the same cache counted."""
    store, ks, vs, query = ragged_layer(2, 3, 2, 90, 16, seed=11, appended=2)
    d = query.shape[-1]
    counted = store.lengths.reshape(-1)
    ref = twin.decode_parts(query, store.k_flat, store.v_flat, store.starts, counted, d ** -0.5, store.n_total,
                            store.max_len, block_n=16, programs=12, fused=fused)[0]
    short = counted - 1  # the last appended token is in the buffer, not in the lengths
    got = twin.decode_parts(query, store.k_flat, store.v_flat, store.starts, short, d ** -0.5, store.n_total,
                            store.max_len, block_n=16, programs=12, fused=fused, pending=1)[0]
    assert torch.equal(got, ref)
    without = twin.decode_parts(query, store.k_flat, store.v_flat, store.starts, short, d ** -0.5, store.n_total,
                                store.max_len, block_n=16, programs=12, fused=fused)[0]
    assert not torch.allclose(without, ref), "leaving the token out must change the output"
