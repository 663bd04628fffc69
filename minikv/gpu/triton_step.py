"""The small fused kernels of a decode step (Triton): fewer launches, the same arithmetic.

A Llama-style layer, run op by op in PyTorch, launches ~40 kernels at one new token per row:
RMSNorm alone is eight (to float, square, mean, add eps, rsqrt, multiply, back to bf16, times
the weight) and RoPE about twelve. At batch 64 each of them moves a few kilobytes, so the
step is a queue of launches, not of bytes. Three kernels here replace them:

* ``add_rmsnorm``  -- residual add + RMSNorm (one program per row)
* ``rope_append``  -- RoPE on the new token's q and k, write k and v into the flat cache at
                      each segment's end, lengths += 1 (one program per (row, KV head))
* ``silu_mul``     -- the MLP's silu(gate) * up

Each one rounds where PyTorch (and transformers' modules) round -- e.g. RMSNorm rounds the
normalised row to bf16 *before* multiplying by the weight -- so the fused step gives the
same numbers as the modules, up to the order of fp32 sums. One exception: ``rope_append`` computes
x cos + rotate_half(x) sin in fp32 and rounds once, where PyTorch rounds each product and the sum; the
two agree within bf16 rounding of the operands' magnitudes (not of the result, which can cancel to ~0). Their plain PyTorch definitions
are in ``minikv.gpu.decoder`` (``torch_add_rmsnorm`` ...), and the tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import gdc_begin, pdl_launch


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, Sum, N, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr, GDC: tl.constexpr):
    gdc_begin(GDC)  # PDL (minikv.gpu.triton_linear): wait for the kernel before, let the next one launch
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(X + row * N + cols, mask=ok, other=0.0)
    if HAS_RES:  # the residual stream: x + r, rounded once, as PyTorch's bf16 add
        r = tl.load(R + row * N + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Sum + row * N + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N  # mean of squares, fp32
    y = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)  # rounded to the input dtype first ...
    w = tl.load(W + cols, mask=ok, other=0.0)
    tl.store(Y + row * N + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Y.dtype.element_ty), mask=ok)  # ... then * w


def add_rmsnorm(x: torch.Tensor, res: torch.Tensor | None, weight: torch.Tensor, eps: float, pdl: bool = False):
    """x, res (rows, N) -> (rmsnorm(x + res) * weight, x + res); res None: no add (the sum is x).

    pdl=True: launched with programmatic dependent launch (every kernel here takes it; see ``minikv.gpu.triton_linear``).
    """
    rows, N = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if res is not None else x
    BLOCK = triton.next_power_of_2(N)
    _add_rmsnorm_kernel[(rows,)](x, res if res is not None else x, weight, y, s, N, eps,
                                 HAS_RES=res is not None, BLOCK=BLOCK, GDC=pdl, num_warps=4 if BLOCK <= 2048 else 8,
                                 **pdl_launch(pdl))
    return y, s


@triton.jit
def _rotate(x, x_partner, sign, cos, sin):
    """x * cos + rotate_half(x) * sin with PyTorch's bf16 rounding after each product and the sum."""
    a = (x.to(tl.float32) * cos).to(x.dtype)
    b = (sign * x_partner.to(tl.float32) * sin).to(x.dtype)
    return (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)


@triton.jit
def _rope_append_kernel(QKV, Pos, Cos, Sin, Qout, K, V, Starts, Lengths, row_stride,
                        H: tl.constexpr, NKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                        D: tl.constexpr, D_PAD: tl.constexpr, GDC: tl.constexpr):
    gdc_begin(GDC)
    seg = tl.program_id(0)  # (row, KV head) segment
    row = seg // NKV
    kvh = seg % NKV
    dims = tl.arange(0, D_PAD)
    live = dims < D
    first = dims < D // 2
    partner = tl.where(first, dims + D // 2, dims - D // 2)  # rotate_half(x)[i] = -x[i + d/2] | x[i - d/2]
    sign = tl.where(first, -1.0, 1.0)
    pos = tl.load(Pos + row)  # this row's position (RoPE angle)
    cos = tl.load(Cos + pos * D + dims, mask=live, other=0.0).to(tl.float32)
    sin = tl.load(Sin + pos * D + dims, mask=live, other=0.0).to(tl.float32)
    base = QKV + row * row_stride  # this row's [q heads | k heads | v heads]

    k = tl.load(base + (H + kvh) * D + dims, mask=live, other=0.0)
    kp = tl.load(base + (H + kvh) * D + partner, mask=live, other=0.0)
    k_rot = _rotate(k, kp, sign, cos, sin)
    v = tl.load(base + (H + NKV + kvh) * D + dims, mask=live, other=0.0)
    length = tl.load(Lengths + seg)
    slot = tl.load(Starts + seg) + length  # first free row of this segment (int64)
    tl.store(K + slot * D + dims, k_rot.to(K.dtype.element_ty), mask=live)
    tl.store(V + slot * D + dims, v.to(V.dtype.element_ty), mask=live)
    tl.store(Lengths + seg, length + 1)  # only this program touches this segment's length

    gi = tl.arange(0, G_PAD)
    heads = kvh * G + gi  # the query heads this KV head serves
    qmask = (gi < G)[:, None] & live[None, :]
    q = tl.load(base + heads[:, None] * D + dims[None, :], mask=qmask, other=0.0)
    qp = tl.load(base + heads[:, None] * D + partner[None, :], mask=qmask, other=0.0)
    q_rot = _rotate(q, qp, sign[None, :], cos[None, :], sin[None, :])
    tl.store(Qout + (row * H + heads[:, None]) * D + dims[None, :], q_rot.to(Qout.dtype.element_ty), mask=qmask)


def rope_append(qkv, pos, cos_table, sin_table, k_flat, v_flat, starts, lengths, H: int, n_kv: int, d: int,
                pdl: bool = False):
    """qkv (b, (H + 2 n_kv) d) -> rotated queries (b, H, d); rotated k and v written at each segment's end."""
    b = qkv.shape[0]
    q = torch.empty(b, H, d, dtype=qkv.dtype, device=qkv.device)
    G = H // n_kv
    _rope_append_kernel[(b * n_kv,)](qkv, pos, cos_table, sin_table, q, k_flat, v_flat, starts, lengths, qkv.stride(0),
                                     H=H, NKV=n_kv, G=G, G_PAD=triton.next_power_of_2(G), D=d,
                                     D_PAD=triton.next_power_of_2(d), GDC=pdl, num_warps=1 if d * G <= 512 else 4,
                                     **pdl_launch(pdl))
    return q


@triton.jit
def _silu_mul_kernel(GU, Out, I, BLOCK: tl.constexpr, GDC: tl.constexpr):
    gdc_begin(GDC)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < I
    g = tl.load(GU + row * 2 * I + cols, mask=ok, other=0.0)
    u = tl.load(GU + row * 2 * I + I + cols, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # silu, rounded as F.silu rounds
    tl.store(Out + row * I + cols, (s.to(tl.float32) * u.to(tl.float32)).to(Out.dtype.element_ty), mask=ok)


def silu_mul(gu: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """gu (rows, 2 I) = [gate | up] -> silu(gate) * up (rows, I)."""
    rows, two_i = gu.shape
    I = two_i // 2
    out = torch.empty(rows, I, dtype=gu.dtype, device=gu.device)
    BLOCK = 1024
    _silu_mul_kernel[(rows, triton.cdiv(I, BLOCK))](gu, out, I, BLOCK=BLOCK, GDC=pdl, num_warps=4, **pdl_launch(pdl))
    return out
