"""Decode attention over the flat ragged cache, in Triton: one kernel, plus a tiny merge.

The idea in plain words
-----------------------
At a decode step every query head has ONE query vector, and must read all keys and values
its KV head holds. The arithmetic is tiny (2 * d flops per key per query head); the time is
the time to stream the cache out of memory. So the kernel is built around reading every
kept key and value exactly once, as fast as memory allows:

* A program handles one (batch row, KV head) segment -- and, through GQA, all g query
  heads that share it. The g queries sit in a small (g, d) tile; each (BLOCK_N, d) tile of
  keys is read once and multiplied by all g queries at the same time (one ``tl.dot``).
* One segment may hold 100k tokens while another holds 50. A single program per segment
  would leave most of the GPU idle behind the longest head. So each segment is cut into
  chunks of ``chunk`` tokens (split-K, a.k.a. flash-decoding), one program per chunk: a
  long head gets many programs, a short head one. Programs whose chunk starts past the end
  of their segment stop at once.
* Inside a chunk the program keeps a running softmax (the "online softmax"): the largest
  logit seen so far ``m``, the sum of exp(logit - m) ``l``, and the weighted sum of values
  ``acc``; when a larger logit arrives, the old sums are scaled down by exp(m_old - m_new).
  It writes its partial output acc / l and its log-sum-exp m + log(l).
* The merge combines a segment's chunks: out = sum_j exp(lse_j - lse) * out_j with
  lse = log sum_j exp(lse_j) -- the same rescaling, once more, across chunks.

Inputs are bf16/fp16 (fp32 works too); logits, softmax and sums are fp32. We work in base 2
(exp2/log2, the scale multiplied by log2(e)) because exp2 is the GPU's native instruction.

The slow, obvious version of the same function is ``minikv.gpu.reference.ragged_attention``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import plan_splits

LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(
    Q, K, V, Starts, Lengths, OutPart, LsePart,
    scale_log2, chunk, num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    seg = tl.program_id(0)  # which (row, KV head) segment
    split = tl.program_id(1)  # which chunk of it
    length = tl.load(Lengths + seg)
    lo = split * chunk
    if lo < length:  # chunks past the end of a short segment do nothing
        hi = tl.where(lo + chunk < length, lo + chunk, length)  # end of this chunk
        start = tl.load(Starts + seg)  # int64: the buffer can hold more than 2**31 elements
        g = tl.arange(0, G_PAD)  # query heads of this group (padded: tl.dot wants >= 16 rows)
        dims = tl.arange(0, D)
        cols = tl.arange(0, BLOCK_N)

        q = tl.load(Q + (seg * G + g[:, None]) * D + dims[None, :], mask=g[:, None] < G, other=0.0)  # (G_PAD, D)
        m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max logit (base 2)
        l = tl.zeros([G_PAD], tl.float32)  # running sum of exp2(logit - m)
        acc = tl.zeros([G_PAD, D], tl.float32)  # running sum of exp2(logit - m) * value

        for n0 in range(lo, hi, BLOCK_N):
            tok = n0 + cols  # (BLOCK_N,) token slots inside the segment
            ok = tok < hi
            rows = (start + tok)[:, None] * D + dims[None, :]  # (BLOCK_N, D) element offsets, int64
            k = tl.load(K + rows, mask=ok[:, None], other=0.0)  # (BLOCK_N, D)
            v = tl.load(V + rows, mask=ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))  # (G_PAD, BLOCK_N) logits, base 2
            m_new = tl.maximum(m, tl.max(s, axis=1))
            shrink = tl.exp2(m - m_new)  # rescale what was summed under the old max
            p = tl.exp2(s - m_new[:, None])  # (G_PAD, BLOCK_N)
            l = l * shrink + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * shrink[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new

        part = (seg * num_splits + split) * G + g  # (G_PAD,) index of (seg, split, head)
        tl.store(OutPart + part[:, None] * D + dims[None, :], acc / l[:, None], mask=g[:, None] < G)
        tl.store(LsePart + part, m + tl.log2(l), mask=g < G)


@triton.jit
def _merge_kernel(OutPart, LsePart, Lengths, Out, chunk, num_splits,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    seg = tl.program_id(0)
    length = tl.load(Lengths + seg)
    n_used = (length + chunk - 1) // chunk  # chunks that held tokens
    g = tl.arange(0, G_PAD)
    dims = tl.arange(0, D)
    live = g < G
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for j in range(0, n_used):
        part = (seg * num_splits + j) * G + g
        lse = tl.load(LsePart + part, mask=live, other=0.0)  # (G_PAD,) log2 of chunk j's softmax mass
        o = tl.load(OutPart + part[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        shrink = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * shrink[:, None] + w[:, None] * o
        l = l * shrink + w
        m = m_new
    out = acc / l[:, None]
    tl.store(Out + (seg * G + g[:, None]) * D + dims[None, :], out.to(Out.dtype.element_ty), mask=live[:, None])


# Tile and launch settings per head dim, chosen by the benchmark's sweep on an H200 (results/gpu/NOTES.md):
# 128-token tiles, 4 warps; per_sm = how many non-empty programs to aim for per multiprocessor.
CONFIG = {
    64: dict(block_n=128, num_warps=4, num_stages=3, per_sm=4),
    128: dict(block_n=128, num_warps=4, num_stages=2, per_sm=8),
}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def flat_decode_attention(query, k_flat, v_flat, starts, lengths, scaling: float, n_total: int, max_len: int,
                          block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                          programs: int | None = None) -> torch.Tensor:
    """One decode step: query (b, H, 1, d) over the segments -> (b, H, 1, d).

    starts, lengths (S,) long with S = b * n_kv; n_total = lengths.sum(), max_len = lengths.max()
    are passed from the host so that launching needs no device -> host sync.
    """
    b, H, q_len, d = query.shape
    assert q_len == 1, "the Triton kernel is for one new token; use the PyTorch path for q > 1"
    S = starts.numel()
    n_kv = S // b
    G = H // n_kv
    assert d == triton.next_power_of_2(d) and d >= 16, f"head dim must be a power of two >= 16, got {d}"
    cfg = CONFIG.get(d, CONFIG[128])
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if programs is None:
        programs = cfg["per_sm"] * _sm_count(query.device.index or 0) if query.is_cuda else 64
    chunk, num_splits = plan_splits(n_total, max_len, block_n, programs)
    G_PAD = max(16, triton.next_power_of_2(G))

    q = query.reshape(S, G, d).contiguous()  # (S, G, d): query head h of row r -> segment r * n_kv + h // G
    out_part = torch.empty(S, num_splits, G, d, device=query.device, dtype=torch.float32)
    lse_part = torch.empty(S, num_splits, G, device=query.device, dtype=torch.float32)
    out = torch.empty(b, H, 1, d, device=query.device, dtype=query.dtype)
    ieee = k_flat.dtype == torch.float32
    _split_kernel[(S, num_splits)](
        q, k_flat, v_flat, starts, lengths, out_part, lse_part,
        scaling * LOG2E, chunk, num_splits,
        G=G, G_PAD=G_PAD, D=d, BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps, num_stages=num_stages,
    )
    _merge_kernel[(S,)](out_part, lse_part, lengths, out, chunk, num_splits, G=G, G_PAD=G_PAD, D=d, num_warps=4)
    return out
