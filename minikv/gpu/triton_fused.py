"""Fewer launches per layer for small models: RMSNorm folded into the matmul that reads it.

With ``ops="triton"`` a layer of the decode step is 9 launches (see ``minikv.gpu.decoder``). For
SmolLM2 at batch 64 every one of them moves less than a megabyte, so each costs its launch and its
ramp-up, not its bytes: the step measured 2.5x its memory floor. Two kernels here take the place of
five (``ops="fused"``):

* ``norm_qkv_rope``  -- residual add + RMSNorm, then h @ W_qkv^T, then RoPE on q and k, then k and v
                        written at each segment's end. One program per (block of rows, head): it owns
                        the head's d output columns, so RoPE's partner column (i +- d/2) is in the same
                        program (computed as two halves, lo and hi). It does NOT move the lengths on:
                        the attention kernel that follows reads ``lengths + 1`` (``pending=1``).
* ``norm_gate_up``   -- residual add + RMSNorm, then gate and up (h @ W_g^T, h @ W_u^T), then
                        silu(gate) * up. Its first program also moves the layer's lengths on by one
                        (the attention before it is finished: kernels on one stream run in order).

The norm is recomputed by every program from the rows it reads (a few hundred kB from L2 for
SmolLM2); the program whose column block is 0 writes the residual sum x + res for the next kernel.
Every value is rounded where PyTorch rounds (x + res, the normalised row, times the weight, the
matmul's output, each RoPE product and their sum, silu, the product), so ``ops="fused"`` gives the
same numbers as ``ops="triton"`` up to the order of fp32 sums.

Measured on the H200 (results/gpu/NOTES.md, ``python -m minikv.gpu.tune``): **slower**, so not the default.
One SmolLM2 layer at batch 64: 23.7 us (23.4 with the K loop unrolled) against 20.1 us for the 8 launches it
replaces; end to end 2.29-2.42 ms per step against 1.88. The launches saved cost ~1 us each, and a program here
waits on memory for every K block twice (the norm's sum of squares, then the matmul), where cuBLAS keeps its tiles
streaming. For the Llama-3.1-8B shape (50-235 MB per matrix) the bytes set the time and cuBLAS reads them faster
(239 against 121 us per layer). Kept as a tested option and as the measured reason for ``ops="triton"``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_step import _rotate


@triton.jit
def _row_rstd(X, R, Sum, rows, row_ok, K: tl.constexpr, eps, write_sum, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """1 / rms of each row of s = x + res (rounded as PyTorch's add); the sum written when write_sum.

    The loop is unrolled (K is a compile-time constant): every block's loads can be in flight at once,
    instead of one memory round trip per block.
    """
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        m = row_ok[:, None] & (ks < K)[None, :]
        offs = rows[:, None] * K + ks[None, :]
        s = tl.load(X + offs, mask=m, other=0.0)
        if HAS_RES:
            s = (s.to(tl.float32) + tl.load(R + offs, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            if write_sum:
                tl.store(Sum + offs, s, mask=m)
        sf = s.to(tl.float32)
        ss += tl.sum(sf * sf, axis=1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _normed_tile(X, R, LnW, rows, row_ok, k0, K: tl.constexpr, rstd, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of rmsnorm(x + res) * weight, rounded as transformers' LlamaRMSNorm."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    m = row_ok[:, None] & k_ok[None, :]
    offs = rows[:, None] * K + ks[None, :]
    s = tl.load(X + offs, mask=m, other=0.0)
    if HAS_RES:
        s = (s.to(tl.float32) + tl.load(R + offs, mask=m, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
    y = (s.to(tl.float32) * rstd[:, None]).to(X.dtype.element_ty)  # normalised, rounded first ...
    w = tl.load(LnW + ks, mask=k_ok, other=0.0)
    return (w.to(tl.float32)[None, :] * y.to(tl.float32)).to(X.dtype.element_ty), ks, k_ok  # ... then * weight


@triton.jit
def _norm_qkv_rope_kernel(X, R, LnW, Sum, W, Bias, Pos, Cos, Sin, Qout, Kc, Vc, Starts, Lengths, M, K: tl.constexpr, eps,
                          H: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HALF_PAD: tl.constexpr,
                          HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)  # 0..H-1: a query head; H..H+NKV-1: a key head; then the value heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rstd = _row_rstd(X, R, Sum, rows, row_ok, K, eps, head == 0, HAS_RES, BLOCK_M, BLOCK_K)

    half = tl.arange(0, HALF_PAD)  # column i of the head's first half; its RoPE partner is i + D/2
    half_ok = half < D // 2
    w_lo = head * D + half  # rows of W_qkv: this head's first half ...
    w_hi = w_lo + D // 2  # ... and second half
    acc_lo = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF_PAD], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: loads of later blocks need not wait
        h, ks, k_ok = _normed_tile(X, R, LnW, rows, row_ok, k0, K, rstd, HAS_RES, BLOCK_K)
        wm = half_ok[:, None] & k_ok[None, :]
        wl = tl.load(W + w_lo[:, None] * K + ks[None, :], mask=wm, other=0.0)  # (HALF_PAD, BLOCK_K)
        wh = tl.load(W + w_hi[:, None] * K + ks[None, :], mask=wm, other=0.0)
        acc_lo += tl.dot(h, tl.trans(wl))
        acc_hi += tl.dot(h, tl.trans(wh))
    if HAS_BIAS:
        acc_lo += tl.load(Bias + w_lo, mask=half_ok, other=0.0).to(tl.float32)[None, :]
        acc_hi += tl.load(Bias + w_hi, mask=half_ok, other=0.0).to(tl.float32)[None, :]
    lo = acc_lo.to(X.dtype.element_ty)  # the matmul's output, rounded as F.linear's
    hi = acc_hi.to(X.dtype.element_ty)

    out_m = row_ok[:, None] & half_ok[None, :]
    pos = tl.load(Pos + rows, mask=row_ok, other=0)  # each row's RoPE position
    tab = pos[:, None] * D + half[None, :]
    cos_lo = tl.load(Cos + tab, mask=out_m, other=0.0).to(tl.float32)
    cos_hi = tl.load(Cos + tab + D // 2, mask=out_m, other=0.0).to(tl.float32)
    sin_lo = tl.load(Sin + tab, mask=out_m, other=0.0).to(tl.float32)
    sin_hi = tl.load(Sin + tab + D // 2, mask=out_m, other=0.0).to(tl.float32)
    rot_lo = _rotate(lo, hi, -1.0, cos_lo, sin_lo)  # x cos + rotate_half(x) sin, rotate_half = [-x_hi, x_lo]
    rot_hi = _rotate(hi, lo, 1.0, cos_hi, sin_hi)
    if head < H:  # a query head: (b, H, d) for the attention kernel
        q_ptr = Qout + (rows[:, None] * H + head) * D + half[None, :]
        tl.store(q_ptr, rot_lo.to(Qout.dtype.element_ty), mask=out_m)
        tl.store(q_ptr + D // 2, rot_hi.to(Qout.dtype.element_ty), mask=out_m)
    else:  # a key or value head: write at each segment's first free row (the lengths move on later)
        j = (head - H) % NKV
        seg = rows * NKV + j
        slot = tl.load(Starts + seg, mask=row_ok, other=0) + tl.load(Lengths + seg, mask=row_ok, other=0)
        if head < H + NKV:
            kv_ptr = Kc + slot[:, None] * D + half[None, :]
            tl.store(kv_ptr, rot_lo.to(Kc.dtype.element_ty), mask=out_m)
            tl.store(kv_ptr + D // 2, rot_hi.to(Kc.dtype.element_ty), mask=out_m)
        else:
            kv_ptr = Vc + slot[:, None] * D + half[None, :]
            tl.store(kv_ptr, lo.to(Vc.dtype.element_ty), mask=out_m)
            tl.store(kv_ptr + D // 2, hi.to(Vc.dtype.element_ty), mask=out_m)


@triton.jit
def _norm_gate_up_kernel(X, R, LnW, Sum, W, Bias, Out, Bump, M, K: tl.constexpr, I, n_bump, eps,
                         HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BUMP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rstd = _row_rstd(X, R, Sum, rows, row_ok, K, eps, pid_n == 0, HAS_RES, BLOCK_M, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the intermediate (gate row n, up row I + n)
    col_ok = cols < I
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: loads of later blocks need not wait
        h, ks, k_ok = _normed_tile(X, R, LnW, rows, row_ok, k0, K, rstd, HAS_RES, BLOCK_K)
        wm = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(W + cols[:, None] * K + ks[None, :], mask=wm, other=0.0)  # (BLOCK_N, BLOCK_K)
        wu = tl.load(W + (I + cols)[:, None] * K + ks[None, :], mask=wm, other=0.0)
        acc_g += tl.dot(h, tl.trans(wg))
        acc_u += tl.dot(h, tl.trans(wu))
    if HAS_BIAS:
        acc_g += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(Bias + I + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    g = acc_g.to(X.dtype.element_ty).to(tl.float32)  # gate and up rounded as F.linear's outputs
    u = acc_u.to(X.dtype.element_ty).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty)  # silu, rounded as F.silu rounds
    out = (s.to(tl.float32) * u).to(Out.dtype.element_ty)
    tl.store(Out + rows[:, None] * I + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
    if HAS_BUMP:
        if (pid_m == 0) & (pid_n == 0):  # the layer's attention is done: its new token now counts
            for s0 in range(0, n_bump, 1024):
                idx = s0 + tl.arange(0, 1024)
                ok = idx < n_bump
                tl.store(Bump + idx, tl.load(Bump + idx, mask=ok, other=0) + 1, mask=ok)


def _check_rows(x, res, ln_w):
    if x.dim() != 2:
        raise ValueError(f"x must be (rows, hidden), got shape {tuple(x.shape)}")
    if res is not None and res.shape != x.shape:
        raise ValueError(f"res must have x's shape {tuple(x.shape)}, got {tuple(res.shape)}")
    if ln_w.shape != (x.shape[1],):
        raise ValueError(f"ln_w must have shape ({x.shape[1]},), got {tuple(ln_w.shape)}")


def _block_m(M: int) -> int:
    return min(64, max(16, triton.next_power_of_2(M)))


def norm_qkv_rope(x, res, ln_w, eps, w_qkv, b_qkv, pos, cos_table, sin_table, k_flat, v_flat, starts, lengths,
                  H: int, n_kv: int, d: int, block_m: int | None = None, block_k: int = 64, num_warps: int = 4,
                  num_stages: int = 2):
    """x, res (b, hidden) -> (rotated queries (b, H, d), x + res); rotated k and v written at each segment's end.

    ``lengths`` is read, not changed: the attention after it must count one more token (``pending=1``) and
    ``norm_gate_up(..., bump=lengths)`` moves them on. ``res`` None: no residual add (the sum is x).
    """
    _check_rows(x, res, ln_w)
    M, K = x.shape
    if w_qkv.shape != ((H + 2 * n_kv) * d, K):
        raise ValueError(f"w_qkv must have shape ({(H + 2 * n_kv) * d}, {K}) for H={H}, n_kv={n_kv}, d={d}, "
                         f"got {tuple(w_qkv.shape)}")
    q = torch.empty(M, H, d, dtype=x.dtype, device=x.device)
    s = torch.empty_like(x) if res is not None else x
    bm = block_m or _block_m(M)
    grid = (triton.cdiv(M, bm), H + 2 * n_kv)
    _norm_qkv_rope_kernel[grid](x, res if res is not None else x, ln_w, s, w_qkv, b_qkv if b_qkv is not None else w_qkv,
                                pos, cos_table, sin_table, q, k_flat, v_flat, starts, lengths, M, K, eps,
                                H=H, NKV=n_kv, D=d, HALF_PAD=max(16, triton.next_power_of_2(d // 2)),
                                HAS_RES=res is not None, HAS_BIAS=b_qkv is not None, BLOCK_M=bm, BLOCK_K=block_k,
                                num_warps=num_warps, num_stages=num_stages)
    return q, s


def norm_gate_up(x, res, ln_w, eps, w_gu, b_gu, bump: torch.Tensor | None = None, block_m: int | None = None,
                 block_n: int = 32, block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
    """x, res (b, hidden) -> (silu(gate) * up (b, I), x + res) with gate/up = rmsnorm(x + res) @ W_gu^T.

    ``bump``: a lengths tensor moved on by one (the layer's new token, appended by ``norm_qkv_rope``).
    """
    _check_rows(x, res, ln_w)
    M, K = x.shape
    two_i = w_gu.shape[0]
    if w_gu.shape[1] != K or two_i % 2:
        raise ValueError(f"w_gu must have shape (2 I, {K}), got {tuple(w_gu.shape)}")
    I = two_i // 2
    out = torch.empty(M, I, dtype=x.dtype, device=x.device)
    s = torch.empty_like(x) if res is not None else x
    bm = block_m or _block_m(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(I, block_n))
    _norm_gate_up_kernel[grid](x, res if res is not None else x, ln_w, s, w_gu, b_gu if b_gu is not None else w_gu, out,
                               bump if bump is not None else x, M, K, I, 0 if bump is None else bump.numel(), eps,
                               HAS_RES=res is not None, HAS_BIAS=b_gu is not None, HAS_BUMP=bump is not None,
                               BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out, s
