"""The step's four matmuls as one small Triton kernel that can start before the kernel in front of it ends.

Why another matmul when cuBLAS is right there: at SmolLM2's size (batch 64, 0.7-3.5 MB of weights per matmul)
each cuBLAS call took 3.0-4.3 us on the H200 for 0.2-0.8 us of bytes (results/gpu/NOTES.md, runs 3-5). The time
is latency: the kernel launches only when the one before it has finished, then its first loads go to memory.
Hopper can overlap the two: with *programmatic dependent launch* (PDL) a kernel is launched while the one before
it still runs; it does what does not depend on that kernel, then waits (``griddepcontrol.wait``) until it has
finished and its writes are visible. A matmul's weights never depend on the kernel before it, so

    prefetch this program's rows of W into L2   # while the previous kernel finishes
    wait for the previous kernel                # gdc_wait: its output (our x) is now visible
    let the next kernel launch                  # gdc_launch_dependents
    y[rows, cols] = x[rows, :] @ W[cols, :]^T   # W from L2, x from L2 (just written)

cuBLAS kernels cannot take part (they neither wait nor signal), so the PDL step (``StaticDecoder(pdl=True)``)
runs every launch of a layer through Triton: this matmul and the small kernels of ``minikv.gpu.triton_step``
and the attention kernel, each with the same two lines at its start. Without PDL (``pdl=False``) the kernel is a
plain matmul; on the CPU, Triton's interpreter runs it (the tests compare it with ``F.linear``).

One program computes a (BLOCK_M, BLOCK_N) tile of y over the whole K: y = x @ W^T + bias, accumulated in fp32 and
rounded once, as cuBLAS does (the sums' order differs). ``plan_for`` picks tile sizes measured on the H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import check_pdl  # Triton-free, so that the decoder can check its arguments without Triton

LINE_BYTES = 128  # an L2 cache line: one prefetch per line of W


@triton.jit
def gdc_begin(GDC: tl.constexpr):
    """PDL's two lines at the start of a kernel: wait for the kernel before (its writes visible), let the next launch.

    Every kernel of a PDL step must wait before it reads or writes anything another kernel of the step touches:
    a kernel that skipped it could run ahead of the one before, and the chain of waits is what orders the step.
    """
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 to fetch the lines of these addresses (no registers written, no wait)."""
    tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _linear_kernel(X, W, B, Y, M, N, K, stride_x, stride_y,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GDC: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr, K_LINES: tl.constexpr,
                   IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = rows of W
    col_ok = cols < N
    w_rows = W + cols.to(tl.int64)[:, None] * K  # (BLOCK_N, 1) start of each W row
    if PREFETCH:  # W does not depend on the kernel before: start pulling it in while that kernel finishes
        lines = tl.arange(0, K_LINES) * LINE  # element offset of each cache line of a W row
        ptrs = tl.where(col_ok[:, None] & (lines < K)[None, :], w_rows + lines[None, :], W)
        _prefetch_l2(ptrs)
    gdc_begin(GDC)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        if IEEE:  # float32 inputs: full-precision products (tl.dot would use TF32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


SHARED_BYTES = 192 * 2 ** 10  # what the pipeline stages may take of a multiprocessor's shared memory (H200: 227 kB)
SMALL_WEIGHT_BYTES = 16 * 2 ** 20  # a matrix this small fits the H200's L2 (50 MB) many times over: prefetch it


def plan_for(M: int, N: int, K: int, element_size: int = 2):
    """(block_m, block_n, block_k, num_warps, num_stages) for x (M, K) @ W (N, K)^T.

    From the H200 sweep (``python -m minikv.gpu.tune --parts linear``, results/gpu/decode_graphs_run6): small
    matrices (SmolLM2: 0.7-3.5 MB) want narrow column tiles -- 16 columns, 32 beyond ~2k columns -- so that even
    576 columns spread over 36 programs, 128-long K blocks and four stages (2.7-4.1 us, cuBLAS 2.9-4.3); large ones
    (Llama-3.1-8B: 33-235 MB) want 64 x 256 tiles (within 1-7 % of the best of 27 tiles, and of cuBLAS).
    One row tile up to 128 rows, then 128 at a time; at most 4 stages, fewer where they would not fit
    ``SHARED_BYTES`` (the LM head at batch 64: 64 x 256 tiles of x and W, 3 stages).
    """
    block_m = min(128, max(16, triton.next_power_of_2(M)))
    if N * K * element_size <= SMALL_WEIGHT_BYTES:
        block_n, block_k = (16 if N <= 2048 else 32), 128
    else:
        block_n, block_k = 64, 256
    per_stage = (block_m + block_n) * block_k * element_size  # shared memory of one stage's x and W tiles
    return block_m, block_n, block_k, 4, max(1, min(4, SHARED_BYTES // per_stage))


def pdl_launch(pdl: bool) -> dict:
    """The launch keyword of a PDL kernel (``launch_pdl``); nothing otherwise (the interpreter does not know it)."""
    return dict(launch_pdl=True) if pdl else {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pdl: bool = False,
           prefetch: bool | None = None, block_n: int | None = None, block_k: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias (N,) -> (M, N), as ``F.linear``; ``pdl=True``: launched with PDL.

    prefetch (default: pdl and W fits L2 easily): pull the program's rows of W into L2 before waiting for the
    previous kernel.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear needs x (M, K) and weight (N, K) with the same K; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"linear needs x, weight and bias in one dtype; got {x.dtype}, {weight.dtype}"
                         + (f", {bias.dtype}" if bias is not None else ""))
    if not weight.is_contiguous() or x.stride(1) != 1:
        raise ValueError("linear needs a contiguous weight and rows of x contiguous (x.stride(1) == 1)")
    if pdl:
        check_pdl(x.device)
    M, N, K = x.shape[0], weight.shape[0], weight.shape[1]
    if prefetch is None:
        prefetch = pdl and N * K * weight.element_size() <= SMALL_WEIGHT_BYTES
    if prefetch and x.device.type != "cuda":
        raise ValueError(f"prefetch=True issues CUDA L2 prefetches: it needs a CUDA device, got {x.device}")
    block_m, bn, bk, nw, ns = plan_for(M, N, K, weight.element_size())
    block_n, block_k = block_n or bn, block_k or bk
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    line = LINE_BYTES // weight.element_size()
    _linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
        x, weight, bias if bias is not None else weight, y, M, N, K, x.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GDC=pdl, PREFETCH=prefetch,
        LINE=line, K_LINES=triton.next_power_of_2(triton.cdiv(K, line)), IEEE=x.dtype == torch.float32,
        num_warps=num_warps or nw,
        num_stages=num_stages or ns, **pdl_launch(pdl))
    return y
