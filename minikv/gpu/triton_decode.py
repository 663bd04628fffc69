"""Decode attention over the flat ragged cache, in Triton: one kernel launch per layer and step.

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
  of their segment stop at once -- so the grid may be sized by the cache's *capacity*
  (what a CUDA graph needs: the same launch at every step) and still do only the work the
  current lengths ask for.
* Inside a chunk the program keeps a running softmax (the "online softmax"): the largest
  logit seen so far ``m``, the sum of exp(logit - m) ``l``, and the weighted sum of values
  ``acc``; when a larger logit arrives, the old sums are scaled down by exp(m_old - m_new).
* A segment that fits in one chunk writes its output directly. Otherwise each chunk writes
  its partial output acc / l and its log-sum-exp m + log(l), and the chunks are merged:
  out = sum_j exp(lse_j - lse) * out_j with lse = log sum_j exp(lse_j) -- the same rescaling,
  once more, across chunks. A second small kernel does the merge (one program per segment).
  It can also be fused into the first (``fused=True``): every chunk program bumps a per-segment
  counter after writing its partial, and the program that arrives last merges them all. One
  launch instead of two -- yet on the H200 the fused version was slower in every shape timed
  (results/gpu/NOTES.md): the last program's merge runs after everything else, alone.

Any head dim up to 256: tiles are padded to the next power of two (at least 16, what
``tl.dot`` needs) and the padding is masked on every load and store, so d = 80 or 96
(Phi-2, Phi-3) work like d = 64 or 128. Larger head dims and other dtypes take
``FlatStore``'s PyTorch path (``kernel_supports`` says which).

Inputs are bf16/fp16 (fp32 works too); logits, softmax and sums are fp32. We work in base 2
(exp2/log2, the scale multiplied by log2(e)) because exp2 is the GPU's native instruction.

The slow, obvious version of the same function is ``minikv.gpu.reference.ragged_attention``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .layout import kernel_supports, plan_splits
from .triton_linear import _prefetch_l2, check_pdl, gdc_begin, pdl_launch

LOG2E = 1.4426950408889634


@triton.jit
def _merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits,
                  G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr):
    """Merge the n_used partial outputs of segment ``seg`` into Out, one query head at a time."""
    dims = tl.arange(0, D_PAD)
    live_d = dims < D
    js = tl.arange(0, SPLIT_BLOCK)
    for gi in tl.static_range(G):
        m_run = float("-inf")  # largest chunk lse seen so far (base 2)
        l_run = 0.0  # sum of exp2(lse_j - m_run)
        acc = tl.zeros([D_PAD], dtype=tl.float32)  # sum of exp2(lse_j - m_run) * out_j
        for j0 in range(0, n_used, SPLIT_BLOCK):  # SPLIT_BLOCK chunks per load: one memory round trip
            j = j0 + js
            ok = j < n_used
            part = (seg * num_splits + j) * G + gi  # (SPLIT_BLOCK,) index of (seg, chunk j, head gi)
            # .cg: read from L2, never a stale L1 line (other programs wrote these)
            lse = tl.load(LsePart + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(OutPart + part[:, None] * D + dims[None, :], mask=ok[:, None] & live_d[None, :],
                        other=0.0, cache_modifier=".cg")  # (SPLIT_BLOCK, D_PAD)
            m_new = tl.maximum(m_run, tl.max(lse, axis=0))
            shrink = tl.exp2(m_run - m_new)
            w = tl.exp2(lse - m_new)  # (SPLIT_BLOCK,) 0 for the masked entries
            acc = acc * shrink + tl.sum(w[:, None] * o, axis=0)
            l_run = l_run * shrink + tl.sum(w, axis=0)
            m_run = m_new
        tl.store(Out + (seg * G + gi) * D + dims, (acc / l_run).to(Out.dtype.element_ty), mask=live_d)


@triton.jit
def _prefetch_first_tile(K, V, Starts, Lengths, seg, split, chunk, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """PDL: pull the first BLOCK_N keys and values of this program's chunk into L2 before waiting.

    Only rows the segment held before this step (the kernel before may still be appending one and moving
    ``lengths`` on: a stale length is one short, never too long), so every address is inside the buffer.
    """
    tok = split * chunk + tl.arange(0, BLOCK_N)
    held = tl.load(Lengths + seg, cache_modifier=".cg")
    at = (tl.load(Starts + seg) + tl.where(tok < held, tok, 0)) * D
    _prefetch_l2(K + at)
    _prefetch_l2(V + at)


@triton.jit(do_not_specialize=["chunk", "num_splits"])
def _split_kernel(
    Q, K, V, Starts, Lengths, Out, OutPart, LsePart, Counter,
    scale_log2, chunk, num_splits,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr, IEEE: tl.constexpr, FUSED_MERGE: tl.constexpr, PENDING: tl.constexpr,
    GDC: tl.constexpr,
):
    seg = tl.program_id(0)  # which (row, KV head) segment
    split = tl.program_id(1)  # which chunk of it
    if GDC:  # PDL (minikv.gpu.triton_linear): prefetch, then wait for the kernel before (it appended the new token)
        _prefetch_first_tile(K, V, Starts, Lengths, seg, split, chunk, D, BLOCK_N)
    gdc_begin(GDC)
    length = tl.load(Lengths + seg) + PENDING  # PENDING = 1: a token written at the end, not yet counted
    lo = split * chunk
    g = tl.arange(0, G_PAD)  # query heads of this group (padded: tl.dot wants >= 16 rows)
    dims = tl.arange(0, D_PAD)  # head dims (padded to a power of two)
    live_g = g < G
    live_d = dims < D
    out_mask = live_g[:, None] & live_d[None, :]
    out_ptrs = Out + (seg * G + g[:, None]) * D + dims[None, :]  # (G_PAD, D_PAD)
    if length == 0:  # an empty segment (never after a decode append): define its output as 0
        if split == 0:
            tl.store(out_ptrs, tl.zeros([G_PAD, D_PAD], dtype=tl.float32).to(Out.dtype.element_ty), mask=out_mask)
    if lo < length:  # chunks past the end of a short segment do nothing
        hi = tl.minimum(lo + chunk, length)  # end of this chunk
        start = tl.load(Starts + seg)  # int64: the buffer can hold more than 2**31 elements
        cols = tl.arange(0, BLOCK_N)

        q = tl.load(Q + (seg * G + g[:, None]) * D + dims[None, :], mask=out_mask, other=0.0)  # (G_PAD, D_PAD)
        m = tl.full([G_PAD], float("-inf"), tl.float32)  # running max logit (base 2)
        l = tl.zeros([G_PAD], tl.float32)  # running sum of exp2(logit - m)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)  # running sum of exp2(logit - m) * value

        for n0 in range(lo, hi, BLOCK_N):
            tok = n0 + cols  # (BLOCK_N,) token slots inside the segment
            ok = tok < hi
            rows = (start + tok)[:, None] * D + dims[None, :]  # (BLOCK_N, D_PAD) element offsets, int64
            kv_mask = ok[:, None] & live_d[None, :]
            k = tl.load(K + rows, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            v = tl.load(V + rows, mask=kv_mask, other=0.0)
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

        n_used = (length + chunk - 1) // chunk  # chunks of this segment that hold tokens
        if n_used == 1:  # the whole segment in one chunk: no merge needed
            tl.store(out_ptrs, (acc / l[:, None]).to(Out.dtype.element_ty), mask=out_mask)
        else:
            part = (seg * num_splits + split) * G + g  # (G_PAD,) index of (seg, split, head)
            tl.store(OutPart + part[:, None] * D + dims[None, :], acc / l[:, None], mask=out_mask)
            tl.store(LsePart + part, m + tl.log2(l), mask=live_g)
            if FUSED_MERGE:
                # all threads' partial stores happen before the counter moves (release);
                # the last chunk program to arrive sees every other partial (acquire) and merges
                tl.debug_barrier()
                arrived = tl.atomic_add(Counter + seg, 1, sem="acq_rel")  # chunks done before this one
                if arrived == n_used - 1:
                    _merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits, G, D, D_PAD, SPLIT_BLOCK)
                    tl.atomic_xchg(Counter + seg, 0)  # ready for the next launch (and the next graph replay)


@triton.jit(do_not_specialize=["chunk", "num_splits"])
def _merge_kernel(OutPart, LsePart, Lengths, Out, chunk, num_splits,
                  G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, SPLIT_BLOCK: tl.constexpr,
                  PENDING: tl.constexpr, GDC: tl.constexpr):
    """The unfused merge (``fused=False``): one program per segment; one-chunk segments are already done."""
    gdc_begin(GDC)
    seg = tl.program_id(0)
    length = tl.load(Lengths + seg) + PENDING
    n_used = (length + chunk - 1) // chunk
    if n_used > 1:
        _merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits, G, D, D_PAD, SPLIT_BLOCK)


# Tile and launch settings per padded head dim, chosen by two sweeps on an H200 (results/gpu/NOTES.md): caches
# of >= 1 GB (issue 7) and of 4k-16k tokens at ratio 0.75 (issue 13, `python -m minikv.gpu.tune`): 128-token
# tiles, two stages and ~4 programs per multiprocessor came within 10 % of each shape's best there; 256 halves the
# tile so that two stages of K and V tiles fit in shared memory. per_sm = non-empty programs to aim for per SM.
CONFIG = {
    64: dict(block_n=128, num_warps=4, num_stages=2, per_sm=4, per_sm_long=3),
    128: dict(block_n=128, num_warps=4, num_stages=2, per_sm=8, per_sm_short=4),
    256: dict(block_n=64, num_warps=4, num_stages=2, per_sm=8),
}
SPLIT_BLOCK = 16  # chunks the merge reads per round trip
SHORT_CHUNK = 1024  # tokens: a plan whose chunks would be shorter than this uses per_sm_short (fewer, longer chunks)
LONG_CHUNK = 512  # tokens: a plan whose chunks would be at least this long uses per_sm_long where the config has it


def padded_head_dim(d: int) -> int:
    """The tile width for head dim d: the next power of two, at least 16 (``tl.dot`` needs 16)."""
    return max(16, triton.next_power_of_2(d))


def config_for(d: int, dtype: torch.dtype) -> dict:
    """Tiling for head dim d: the swept settings of the nearest padded dim; fp32 tiles halved above 128."""
    d_pad = padded_head_dim(d)
    cfg = dict(CONFIG.get(d_pad, CONFIG[64] if d_pad < 64 else CONFIG[256]))
    if dtype == torch.float32 and d_pad >= 256:
        cfg["block_n"] = 32  # 4-byte elements: keep two stages of K and V tiles within shared memory
    return cfg


def fused_merge_default() -> bool:
    """Two launches (kernel + merge) unless MINIKV_FUSED_MERGE=1: the fused merge was slower (results/gpu/NOTES.md)."""
    return os.environ.get("MINIKV_FUSED_MERGE", "0") == "1"


def launch_plan(n_total: int, max_len: int, S: int, d: int, dtype: torch.dtype, sms: int, block_n: int | None = None,
                num_warps: int | None = None, num_stages: int | None = None, programs: int | None = None):
    """(block_n, num_warps, num_stages, chunk, num_splits) for S segments holding n_total tokens (longest max_len).

    Host ints only (a CUDA graph passes capacities). Settings not given come from ``CONFIG`` and the sweeps:
    * ~per_sm programs per multiprocessor; 4 instead of 8 for d = 128 when chunks would be short (< SHORT_CHUNK);
      3 instead of 4 for d <= 64 when chunks would be long (>= LONG_CHUNK) and 3 per SM still outnumber the segments
      (the regime measured): AdaKV's ragged SmolLM2 cache at batch 64,
      ratio 0.5 and 0.75, 1.734 instead of 1.766 ms per step and 2.444 instead of 2.547 (run 9), while at 0.875 (chunks
      of ~370 tokens) 4 per SM stayed faster (1.346 against 1.365 ms);
    * near-equal segments (longest <= 1.25 x mean) that are between 1 and 2 per multiprocessor, d <= 64: one
      program per segment, no merge, three stages -- every program starts in the first wave and none waits for a
      merge (SnapKV's SmolLM2 cache at batch 64: 27.7 us instead of 33.4 per layer, results/gpu/NOTES.md).
    """
    cfg = config_for(d, dtype)
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    stages_given = num_stages is not None
    num_stages = num_stages or cfg["num_stages"]
    if programs is None:
        programs = cfg["per_sm"] * sms
        if "per_sm_short" in cfg and n_total < SHORT_CHUNK * programs:
            programs = cfg["per_sm_short"] * sms
        elif "per_sm_long" in cfg and n_total >= LONG_CHUNK * programs and cfg["per_sm_long"] * sms > S:
            programs = cfg["per_sm_long"] * sms
        if sms <= S <= 2 * sms and max_len * S <= 1.25 * n_total and padded_head_dim(d) <= 64:
            programs = 1
            num_stages = num_stages if stages_given else 3
    chunk, num_splits = plan_splits(n_total, max_len, block_n, programs)
    return block_n, num_warps, num_stages, chunk, num_splits


_COUNTERS: dict = {}


def merge_counters(device: torch.device, n_segments: int, owner: int = 0) -> torch.Tensor:
    """The fused merge's per-segment arrival counters: zeros, reset by the kernel itself after every merge.

    One buffer per (device, number of segments, owner), kept for the life of the process: a CUDA graph
    captured with it keeps pointing at it. It must first be made outside a graph capture. ``owner`` (the
    segments' ``starts`` address) keeps calls that may run at the same time -- on two streams -- apart.
    """
    key = (str(device), n_segments, owner)
    buf = _COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("flat_decode_attention: run it once eagerly (warm-up) before capturing it in a CUDA graph")
        buf = _COUNTERS[key] = torch.zeros(n_segments, dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def flat_decode_attention(query, k_flat, v_flat, starts, lengths, scaling: float, n_total: int, max_len: int,
                          block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                          programs: int | None = None, fused: bool | None = None, pending: int = 0,
                          pdl: bool = False) -> torch.Tensor:
    """One decode step: query (b, H, 1, d) over the segments -> (b, H, 1, d).

    starts, lengths (S,) long with S = b * n_kv. ``n_total`` and ``max_len`` are host ints that size
    the grid: the tokens held and the longest segment -- or any upper bounds (a CUDA graph passes the
    capacity, so that the launch stays the same while the lengths grow on the device).
    ``pending=1``: each segment holds one more token than ``lengths`` says (written at its end by
    ``minikv.gpu.triton_fused.norm_qkv_rope``, counted later in the same step).
    ``pdl=True``: launched with programmatic dependent launch (``minikv.gpu.triton_linear``; Hopper or newer).
    """
    b, H, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"flat_decode_attention is for one new token per row (query (b, H, 1, d)), got q = {q_len}; "
                         "FlatStore.attend uses its PyTorch path for q > 1")
    if not kernel_supports(d, k_flat.dtype):
        raise ValueError(f"flat_decode_attention supports head dims 1..256 in float16/bfloat16/float32, got head dim "
                         f"{d} in {k_flat.dtype}; FlatStore.attend uses its PyTorch path for these")
    if pending not in (0, 1) or isinstance(pending, bool):
        raise ValueError(f"pending must be 0 or 1 (tokens written past each length, not yet counted), got {pending!r}")
    if pdl:
        check_pdl(query.device)
    S = starts.numel()
    n_kv = S // b
    G = H // n_kv
    sms = _sm_count(query.device.index or 0) if query.is_cuda else 16
    block_n, num_warps, num_stages, chunk, num_splits = launch_plan(
        n_total, max_len, S, d, k_flat.dtype, sms, block_n, num_warps, num_stages, programs)
    fused = fused_merge_default() if fused is None else fused
    G_PAD = max(16, triton.next_power_of_2(G))
    D_PAD = padded_head_dim(d)

    q = query.reshape(S, G, d).contiguous()  # (S, G, d): query head h of row r -> segment r * n_kv + h // G
    out = torch.empty(b, H, 1, d, device=query.device, dtype=query.dtype)
    parts = max(num_splits, 2)  # (a one-chunk plan writes no partials; keep the buffers non-empty)
    out_part = torch.empty(S, parts, G, d, device=query.device, dtype=torch.float32)
    lse_part = torch.empty(S, parts, G, device=query.device, dtype=torch.float32)
    counter = merge_counters(query.device, S, starts.data_ptr()) if fused else lse_part  # (unused when not fused)
    ieee = k_flat.dtype == torch.float32
    _split_kernel[(S, num_splits)](
        q, k_flat, v_flat, starts, lengths, out, out_part, lse_part, counter,
        scaling * LOG2E, chunk, num_splits,
        G=G, G_PAD=G_PAD, D=d, D_PAD=D_PAD, BLOCK_N=block_n, SPLIT_BLOCK=SPLIT_BLOCK, IEEE=ieee,
        FUSED_MERGE=fused, PENDING=pending, GDC=pdl, num_warps=num_warps, num_stages=num_stages, **pdl_launch(pdl),
    )
    if not fused and num_splits > 1:
        _merge_kernel[(S,)](out_part, lse_part, lengths, out, chunk, num_splits,
                            G=G, D=d, D_PAD=D_PAD, SPLIT_BLOCK=SPLIT_BLOCK, PENDING=pending, GDC=pdl, num_warps=4,
                            **pdl_launch(pdl))
    return out
