"""A line-by-line PyTorch twin of the Triton decode kernel (``minikv/gpu/triton_decode.py``), for the CPU.

The Triton kernel needs a GPU. This module runs the same algorithm anywhere, written so that it can be
read next to the kernel line by line: the same programs (``split_kernel``, ``merge_chunks``,
``merge_kernel``), the same variable names, the same flat layout (``minikv.gpu.layout``), the same split
of each segment into chunks (``layout.plan_splits``). Triton's words map onto PyTorch like this:

    Q + offsets  (a pointer plus offsets)    -> ``Ptr(q) + offsets`` (a flat tensor and offsets into it)
    tl.load(ptr, mask=..., other=0.0)        -> ``load(ptr, mask=..., other=0.0)``
    tl.store(ptr, x, mask=...)               -> ``store(ptr, x, mask=...)``
    tl.program_id(0), tl.program_id(1)       -> the arguments ``seg``, ``split`` (``launch`` walks the grid)
    tl.dot(a, b)                             -> ``dot(a, b)``: products summed in fp32
    tl.atomic_add / tl.atomic_xchg           -> ``atomic_add`` / ``atomic_xchg`` (programs run one at a time here)
    tl.exp2, tl.log2, tl.maximum, tl.where   -> torch.exp2, torch.log2, torch.maximum, torch.where

What the programs compute (base 2, because exp2 is the GPU's native instruction; the scale is multiplied
by log2(e), and 2 ** (x * log2 e) = e ** x):

* ``split_kernel`` -- one chunk of one segment. It walks the chunk in tiles of BLOCK_N tokens with an
  *online softmax* (Milakov & Gimelshein 2018): running max logit ``m``, running sum ``l = sum 2**(s - m)``,
  running weighted sum of values ``acc``; when a tile raises the max, the old ``l`` and ``acc`` are scaled by
  ``shrink = 2**(m_old - m_new)``. A segment that fits in one chunk writes ``acc / l`` as its output.
  Otherwise the chunk writes its partial output ``acc / l`` and its log-sum-exp ``m + log2(l)``, and the
  program that finishes last (an atomic counter per segment says which) merges them: ``merge_chunks``.
* ``merge_chunks`` -- out = sum_j 2**(lse_j - lse) * out_j with lse = log2 sum_j 2**lse_j, the same running
  rescaling once more, across chunks (split-K, as in Flash-Decoding).
* ``merge_kernel`` -- the unfused variant (``fused=False``): a second launch, one program per segment.

It is slow -- Python loops over programs and tiles -- and meant for reading, testing and teaching on small
inputs. ``minikv.gpu.reference.ragged_attention`` is the definition that both must match.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from .layout import plan_splits

LOG2E = 1.4426950408889634  # log2(e), as in triton_decode
SPLIT_BLOCK = 16  # chunks the merge reads per round trip, as triton_decode.SPLIT_BLOCK
KERNEL_FILE = Path(__file__).with_name("triton_decode.py")


# -- Triton's vocabulary, in PyTorch ------------------------------------------------------------------
class Ptr:
    """A pointer into a tensor seen as flat: ``Ptr(t) + offsets`` is what ``T + offsets`` is in a Triton kernel.

    >>> load(Ptr(torch.tensor([5., 6., 7.])) + torch.tensor([2, 0]))
    tensor([7., 5.])
    """

    def __init__(self, tensor: torch.Tensor, offsets=0):
        self.tensor = tensor.reshape(-1)  # a view of a contiguous tensor: stores land in the caller's tensor
        self.offsets = offsets

    def __add__(self, offsets) -> "Ptr":
        return Ptr(self.tensor, self.offsets + offsets)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype


def load(ptr: Ptr, mask=None, other: float = 0.0) -> torch.Tensor:
    """tl.load: read at the pointer's offsets; lanes where ``mask`` is False read ``other`` (and touch no memory)."""
    offsets = torch.as_tensor(ptr.offsets)
    if mask is None:
        return ptr.tensor[offsets]
    safe = torch.where(mask, offsets, 0)  # a masked-off lane may point past the end: never read it
    return torch.where(mask, ptr.tensor[safe], torch.tensor(other, dtype=ptr.dtype))


def store(ptr: Ptr, value, mask=None) -> None:
    """tl.store: write ``value`` at the pointer's offsets, only where ``mask`` is True."""
    offsets, value = torch.broadcast_tensors(torch.as_tensor(ptr.offsets), torch.as_tensor(value))
    if mask is not None:
        keep = torch.as_tensor(mask).expand(offsets.shape)
        offsets, value = offsets[keep], value[keep]
    ptr.tensor[offsets] = value.to(ptr.dtype)


def atomic_add(ptr: Ptr, value) -> torch.Tensor:
    """tl.atomic_add: add ``value`` at the (one) offset and return the value that was there before."""
    old = ptr.tensor[ptr.offsets].clone()
    ptr.tensor[ptr.offsets] += value
    return old


def atomic_xchg(ptr: Ptr, value) -> torch.Tensor:
    """tl.atomic_xchg: write ``value`` at the (one) offset and return the value that was there before."""
    old = ptr.tensor[ptr.offsets].clone()
    ptr.tensor[ptr.offsets] = value
    return old


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tl.dot: a matrix product accumulated in fp32 (products of bf16/fp16 numbers are exact in fp32)."""
    return a.float() @ b.float()


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2: 1 -> 1, 3 -> 4, 16 -> 16."""
    return 1 << (n - 1).bit_length()


# -- the programs ---------------------------------------------------------------------------------------
def merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits, G, D, D_PAD, SPLIT_BLOCK):
    """``_merge_chunks``: merge the n_used partial outputs of segment ``seg`` into Out, one query head at a time."""
    dims = torch.arange(0, D_PAD)
    live_d = dims < D
    js = torch.arange(0, SPLIT_BLOCK)
    for gi in range(G):
        m_run = torch.tensor(float("-inf"))  # largest chunk lse seen so far (base 2)
        l_run = torch.tensor(0.0)  # sum of exp2(lse_j - m_run)
        acc = torch.zeros([D_PAD])  # sum of exp2(lse_j - m_run) * out_j
        for j0 in range(0, n_used, SPLIT_BLOCK):  # SPLIT_BLOCK chunks per load
            j = j0 + js
            ok = j < n_used
            part = (seg * num_splits + j) * G + gi  # (SPLIT_BLOCK,) index of (seg, chunk j, head gi)
            lse = load(LsePart + part, mask=ok, other=float("-inf"))
            o = load(OutPart + (part[:, None] * D + dims[None, :]), mask=ok[:, None] & live_d[None, :],
                     other=0.0)  # (SPLIT_BLOCK, D_PAD)
            m_new = torch.maximum(m_run, lse.max(dim=0).values)
            shrink = torch.exp2(m_run - m_new)
            w = torch.exp2(lse - m_new)  # (SPLIT_BLOCK,) 0 for the masked entries
            acc = acc * shrink + (w[:, None] * o).sum(dim=0)
            l_run = l_run * shrink + w.sum(dim=0)
            m_run = m_new
        store(Out + ((seg * G + gi) * D + dims), (acc / l_run).to(Out.dtype), mask=live_d)


def split_kernel(seg, split, Q, K, V, Starts, Lengths, Out, OutPart, LsePart, Counter,
                 scale_log2, chunk, num_splits, G, G_PAD, D, D_PAD, BLOCK_N, SPLIT_BLOCK, IEEE, FUSED_MERGE, PENDING,
                 GDC=False):
    """One program of ``_split_kernel``: chunk ``split`` of segment ``seg``.

    GDC (the kernel's programmatic dependent launch: prefetch, wait for the kernel before) has nothing to do
    here: the twin's programs run after everything before them, one at a time.
    """
    length = load(Lengths + seg) + PENDING  # PENDING = 1: a token written at the end, not yet counted
    lo = split * chunk
    g = torch.arange(0, G_PAD)  # query heads of this group (padded, as tl.dot wants >= 16 rows on the GPU)
    dims = torch.arange(0, D_PAD)  # head dims (padded to a power of two)
    live_g = g < G
    live_d = dims < D
    out_mask = live_g[:, None] & live_d[None, :]
    out_ptrs = Out + ((seg * G + g[:, None]) * D + dims[None, :])  # (G_PAD, D_PAD)
    if length == 0:  # an empty segment (never after a decode append): define its output as 0
        if split == 0:
            store(out_ptrs, torch.zeros([G_PAD, D_PAD]).to(Out.dtype), mask=out_mask)
    if lo < length:  # chunks past the end of a short segment do nothing
        hi = torch.clamp(length, max=lo + chunk)  # tl.minimum(lo + chunk, length): end of this chunk
        start = load(Starts + seg)  # first row of the segment in the flat buffer
        cols = torch.arange(0, BLOCK_N)

        q = load(Q + ((seg * G + g[:, None]) * D + dims[None, :]), mask=out_mask, other=0.0)  # (G_PAD, D_PAD)
        m = torch.full([G_PAD], float("-inf"))  # running max logit (base 2)
        l = torch.zeros([G_PAD])  # running sum of exp2(logit - m)
        acc = torch.zeros([G_PAD, D_PAD])  # running sum of exp2(logit - m) * value

        for n0 in range(lo, hi, BLOCK_N):
            tok = n0 + cols  # (BLOCK_N,) token slots inside the segment
            ok = tok < hi
            rows = (start + tok)[:, None] * D + dims[None, :]  # (BLOCK_N, D_PAD) element offsets
            kv_mask = ok[:, None] & live_d[None, :]
            k = load(K + rows, mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
            v = load(V + rows, mask=kv_mask, other=0.0)
            s = dot(q, k.T)  # (G_PAD, BLOCK_N): tl.dot(q, tl.trans(k))
            s = torch.where(ok[None, :], s * scale_log2, float("-inf"))  # logits, base 2
            m_new = torch.maximum(m, s.max(dim=1).values)
            shrink = torch.exp2(m - m_new)  # rescale what was summed under the old max
            p = torch.exp2(s - m_new[:, None])  # (G_PAD, BLOCK_N)
            l = l * shrink + p.sum(dim=1)
            acc = acc * shrink[:, None] + dot(p if IEEE else p.to(v.dtype), v)  # bf16/fp16: p rounded, as on the GPU
            m = m_new

        n_used = (length + chunk - 1) // chunk  # chunks of this segment that hold tokens
        if n_used == 1:  # the whole segment in one chunk: no merge needed
            store(out_ptrs, (acc / l[:, None]).to(Out.dtype), mask=out_mask)
        else:
            part = (seg * num_splits + split) * G + g  # (G_PAD,) index of (seg, split, head)
            store(OutPart + (part[:, None] * D + dims[None, :]), acc / l[:, None], mask=out_mask)
            store(LsePart + part, m + torch.log2(l), mask=live_g)
            if FUSED_MERGE:
                # (on the GPU a barrier and acquire/release order the stores; here programs run one at a time)
                arrived = atomic_add(Counter + seg, 1)  # chunks done before this one
                if arrived == n_used - 1:  # the last chunk to finish merges them all
                    merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits, G, D, D_PAD, SPLIT_BLOCK)
                    atomic_xchg(Counter + seg, 0)  # ready for the next launch


def merge_kernel(seg, OutPart, LsePart, Lengths, Out, chunk, num_splits, G, D, D_PAD, SPLIT_BLOCK, PENDING, GDC=False):
    """One program of ``_merge_kernel`` (the unfused merge): one-chunk segments are already done."""
    length = load(Lengths + seg) + PENDING
    n_used = (length + chunk - 1) // chunk
    if n_used > 1:
        merge_chunks(OutPart, LsePart, Out, seg, n_used, num_splits, G, D, D_PAD, SPLIT_BLOCK)


def launch(kernel, grid, *args, order: torch.Generator | None = None) -> None:
    """``kernel[grid](*args)``: run every program of the grid, one after the other.

    The GPU runs programs in no fixed order; ``order`` (a seeded generator) shuffles them to show that the
    result does not depend on it.
    """
    ids = [(i,) for i in range(grid[0])] if len(grid) == 1 else [(i, j) for i in range(grid[0]) for j in range(grid[1])]
    if order is not None:
        ids = [ids[i] for i in torch.randperm(len(ids), generator=order).tolist()]
    for pid in ids:
        kernel(*pid, *args)


# -- the host side, as in triton_decode.flat_decode_attention -------------------------------------------
def _check(query, k_flat, starts, lengths, block_n, programs):
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be (b, H, 1, d): one new token per row (decode), got shape {tuple(query.shape)}")
    b, H, _, d = query.shape
    if k_flat.dim() != 2 or k_flat.shape[1] != d:
        raise ValueError(f"k_flat must be (rows, d) with the query's head dim d = {d}, got {tuple(k_flat.shape)}")
    S = starts.numel()
    if lengths.numel() != S or S % b:
        raise ValueError(f"starts and lengths must both hold b * n_kv entries (b = {b}), got {S} and {lengths.numel()}")
    if H % (S // b):
        raise ValueError(f"the query's {H} heads must be a multiple of n_kv = {S // b} KV heads (GQA)")
    if int(lengths.min()) < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    if block_n < 1 or programs < 1:
        raise ValueError(f"block_n and programs must be >= 1, got block_n={block_n}, programs={programs}")


def decode_parts(query, k_flat, v_flat, starts, lengths, scaling: float, n_total: int, max_len: int,
                 block_n: int = 128, programs: int = 64, fused: bool = True, order: torch.Generator | None = None,
                 pending: int = 0):
    """The kernel, keeping what its chunks wrote: (out, out_part, lse_part, chunk, num_splits).

    out (b, H, 1, d); out_part (S, num_splits, G, d): each chunk's own softmax-weighted values; lse_part
    (S, num_splits, G): each chunk's log2-sum-exp2 of its logits. Segments that fit in one chunk write no
    partials (their slots stay NaN here), nor do chunks past a segment's end. block_n and programs play the
    kernel's roles (on a non-CUDA device the kernel aims for 64 programs); fused=False merges in a second
    launch; order shuffles the programs (see ``launch``); pending=1 counts one token past each length (the
    decoder's ``ops="fused"`` writes it before the lengths move on).
    """
    _check(query, k_flat, starts, lengths, block_n, programs)
    b, H, _, d = query.shape
    S = starts.numel()
    n_kv = S // b
    G = H // n_kv
    chunk, num_splits = plan_splits(n_total, max_len, block_n, programs)
    G_PAD = max(16, next_power_of_2(G))
    D_PAD = max(16, next_power_of_2(d))

    q = query.reshape(S, G, d).contiguous()  # (S, G, d): query head h of row r -> segment r * n_kv + h // G
    out = torch.empty(b, H, 1, d, dtype=query.dtype)
    out_part = torch.full((S, num_splits, G, d), float("nan"))
    lse_part = torch.full((S, num_splits, G), float("nan"))
    counter = torch.zeros(S, dtype=torch.int32)  # per-segment arrival counters (the kernel keeps one buffer)
    ieee = k_flat.dtype == torch.float32
    launch(split_kernel, (S, num_splits), Ptr(q), Ptr(k_flat), Ptr(v_flat), Ptr(starts), Ptr(lengths), Ptr(out),
           Ptr(out_part), Ptr(lse_part), Ptr(counter), scaling * LOG2E, chunk, num_splits,
           G, G_PAD, d, D_PAD, block_n, SPLIT_BLOCK, ieee, fused, pending, order=order)
    if not fused and num_splits > 1:
        launch(merge_kernel, (S,), Ptr(out_part), Ptr(lse_part), Ptr(lengths), Ptr(out), chunk, num_splits,
               G, d, D_PAD, SPLIT_BLOCK, pending, order=order)
    if counter.any():  # every merge resets its counter: a non-zero one means a segment was never merged
        raise RuntimeError(f"merge counters not reset: {counter.tolist()}")
    return out, out_part, lse_part, chunk, num_splits


def flat_decode_attention(query, k_flat, v_flat, starts, lengths, scaling: float, n_total: int, max_len: int,
                          block_n: int = 128, programs: int = 64, fused: bool = True) -> torch.Tensor:
    """One decode step: query (b, H, 1, d) over the segments -> (b, H, 1, d), as the Triton kernel computes it."""
    return decode_parts(query, k_flat, v_flat, starts, lengths, scaling, n_total, max_len, block_n, programs, fused)[0]


def attend(store, query, scaling: float, block_n: int = 128, programs: int = 64, fused: bool = True) -> torch.Tensor:
    """The twin on a ``FlatStore`` (what ``store.attend`` runs on CUDA): query (b, H, 1, d) -> (b, H, 1, d)."""
    return flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store.lengths.reshape(-1),
                                 scaling, store.n_total, store.max_len, block_n, programs, fused)


# -- the kernel's own text, for reading next to the twin -------------------------------------------------
def kernel_functions(file: str = KERNEL_FILE.name) -> dict[str, ast.FunctionDef]:
    """The top-level functions of one of minikv/gpu's files (default triton_decode.py), parsed from its text
    (Triton need not be installed)."""
    path = _gpu_file(file)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _gpu_file(file: str) -> Path:
    path = KERNEL_FILE.with_name(file) if isinstance(file, str) and file and "/" not in file and "\\" not in file else None
    if path is None or not path.is_file() or path.suffix != ".py":
        names = sorted(p.name for p in KERNEL_FILE.parent.glob("triton_*.py"))
        raise ValueError(f"file must be a Python file of minikv/gpu, e.g. one of {names}; got {file!r}")
    return path


def kernel_source(name: str = "_split_kernel", file: str = KERNEL_FILE.name) -> str:
    """The source of one function of a minikv/gpu file (default triton_decode.py), its decorator included.

    >>> kernel_source("_merge_kernel").splitlines()[0].startswith("@triton.jit")
    True
    >>> "gdc_wait" in kernel_source("gdc_begin", "triton_linear.py")
    True
    """
    path = _gpu_file(file)
    funcs = kernel_functions(file)
    if name not in funcs:
        raise ValueError(f"name must be a function of {path.name}, one of {sorted(funcs)}; got {name!r}")
    node = funcs[name]
    first = min([dec.lineno for dec in node.decorator_list] + [node.lineno])
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(lines[first - 1:node.end_lineno])


def kernel_constant(name: str):
    """A module-level constant of triton_decode.py (e.g. ``SPLIT_BLOCK``), read from its text."""
    for node in ast.parse(KERNEL_FILE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"name must be a module-level constant of {KERNEL_FILE.name}, got {name!r}")


def assigned_names(func: ast.FunctionDef) -> set[str]:
    """Arguments and every name a function assigns (its vocabulary), for checking that the twin keeps the kernel's."""
    names = {a.arg for a in func.args.args}
    for node in ast.walk(func):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names
