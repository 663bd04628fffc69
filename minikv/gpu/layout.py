"""The flat ragged layout: every (batch row, KV head) owns one *segment* of a single buffer.

Picture for b = 1, n_kv = 3, a reserve of 2 decode slots per segment (``.`` = free slot):

    lengths  = [4, 1, 3]
    capacity = [6, 3, 5]                      # lengths + reserve
    starts   = [0, 6, 9]                      # exclusive cumulative sum of capacity (like cu_seqlens)
    buffer   = |k k k k . .|k . .|k k k . .|  # (total capacity, d), one row per token

Segment s = row * n_kv + head holds its tokens at buffer[starts[s] : starts[s] + lengths[s]],
oldest first. A decode step writes token t of segment s at buffer[starts[s] + lengths[s]]:
in place, no copy of the old tokens, until the reserve runs out.

Everything here is plain PyTorch and works on any device (the tests run it on the CPU).
No Python loop over heads: the layout is built with cumulative sums and one gather/scatter.
"""

from __future__ import annotations

import functools

import torch


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``[4, 1, 3] -> [0, 4, 5]``: where each segment starts when segments sit end to end."""
    return torch.cumsum(x, dim=0) - x


def kept_positions(keep: torch.Tensor, n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept token goes inside its segment.

    keep (b, n_kv, L) bool, n_total = keep.sum() known on the host ->
    src (n_total,) flat index into (b * n_kv * L) of each kept token, in (row, head, token) order;
    pos (n_total,) its slot inside its own segment (0, 1, 2, ... per head).

    >>> keep = torch.tensor([[[True, False, True], [False, True, False]]])
    >>> kept_positions(keep, 3)
    (tensor([0, 2, 4]), tensor([0, 1, 0]))
    """
    flat = keep.reshape(-1)
    try:  # told the output size, nonzero_static needs no device -> host sync
        src = torch.nonzero_static(flat, size=n_total).reshape(-1)
    except (AttributeError, NotImplementedError, RuntimeError):  # pragma: no cover - older PyTorch / device
        src = flat.nonzero().reshape(-1)
    rank = (keep.cumsum(dim=-1) - 1).reshape(-1)  # (b*n_kv*L,) slot of each token if kept
    return src, rank[src]


def segment_of_each_token(lengths: torch.Tensor, n_total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens laid out segment after segment: (segment id, slot inside the segment).

    >>> segment_of_each_token(torch.tensor([2, 0, 3]), 5)
    (tensor([0, 0, 2, 2, 2]), tensor([0, 1, 0, 1, 2]))
    """
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=n_total)
    first = exclusive_cumsum(lengths)  # (S,) index of each segment's first token when packed densely
    slot = torch.arange(n_total, device=lengths.device) - first[seg]
    return seg, slot


def build_flat(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, reserve: int):
    """Pack the kept tokens of (b, n_kv, L, d) keys/values into flat buffers with room to grow.

    Returns (k_flat, v_flat, starts, lengths, capacity, n_total, max_len):
      k_flat, v_flat (sum(capacity), d); starts, lengths, capacity (b * n_kv,) long;
      n_total = tokens held, max_len = longest segment (host ints: the only host sync).
    """
    b, n_kv, L, d = keys.shape
    lengths = keep.sum(dim=-1).reshape(-1)  # (S,) S = b * n_kv segments
    n_total, max_len = torch.stack([lengths.sum(), lengths.max()]).tolist()  # one sync, two numbers
    capacity = lengths + reserve  # (S,)
    starts = exclusive_cumsum(capacity)  # (S,)
    src, pos = kept_positions(keep, n_total)  # (n_total,)
    seg = src // L  # (n_total,) segment = row * n_kv + head of each kept token
    dst = starts[seg] + pos  # (n_total,) its row in the flat buffer
    total_capacity = n_total + reserve * b * n_kv
    # zeros, not empty: paths that read whole capacities (SDPA + a length mask) multiply free slots by a
    # softmax weight of 0, and 0 * (uninitialised NaN) would be NaN
    k_flat = keys.new_zeros(total_capacity, d)
    v_flat = values.new_zeros(total_capacity, d)
    k_flat[dst] = keys.reshape(-1, d)[src]
    v_flat[dst] = values.reshape(-1, d)[src]
    return k_flat, v_flat, starts, lengths, capacity, n_total, max_len


def append_slots(starts: torch.Tensor, lengths: torch.Tensor, q: int) -> torch.Tensor:
    """Rows of the flat buffer where q new tokens of every segment go: (S, q).

    >>> append_slots(torch.tensor([0, 6, 9]), torch.tensor([4, 1, 3]), 2)
    tensor([[ 4,  5],
            [ 7,  8],
            [12, 13]])
    """
    ends = starts + lengths  # (S,) first free row of each segment
    return ends[:, None] if q == 1 else ends[:, None] + torch.arange(q, device=starts.device)


def relayout(k_flat, v_flat, starts, lengths, n_total: int, reserve: int):
    """Copy every segment into fresh buffers with ``reserve`` free slots each (when the old reserve is used up).

    Returns (k_flat, v_flat, starts, capacity) of the new layout; lengths do not change.
    """
    seg, slot = segment_of_each_token(lengths, n_total)  # (n_total,)
    capacity = lengths + reserve
    new_starts = exclusive_cumsum(capacity)
    src = starts[seg] + slot
    dst = new_starts[seg] + slot
    total_capacity = n_total + reserve * lengths.numel()
    new_k = k_flat.new_zeros(total_capacity, k_flat.shape[1])  # zeros: see build_flat
    new_v = v_flat.new_zeros(total_capacity, v_flat.shape[1])
    new_k[dst] = k_flat[src]
    new_v[dst] = v_flat[src]
    return new_k, new_v, new_starts, capacity


def to_dense(k_flat, v_flat, starts, lengths, max_len: int, b: int, n_kv: int):
    """Pad every segment to the longest: keys, values (b, n_kv, max_len, d) and valid (b, n_kv, max_len)."""
    d = k_flat.shape[1]
    pos = torch.arange(max_len, device=starts.device)  # (Lmax,)
    valid = pos[None, :] < lengths[:, None]  # (S, Lmax)
    rows = (starts[:, None] + pos)[valid]  # (n_total,) buffer rows of the held tokens, segment by segment
    keys = k_flat.new_zeros(lengths.numel(), max_len, d)
    values = v_flat.new_zeros(lengths.numel(), max_len, d)
    keys[valid], values[valid] = k_flat[rows], v_flat[rows]
    return keys.reshape(b, n_kv, max_len, d), values.reshape(b, n_kv, max_len, d), valid.reshape(b, n_kv, max_len)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_supports(d: int, dtype: torch.dtype) -> bool:
    """Whether the Triton decode kernel handles head dim d in this dtype (else: the PyTorch path).

    Head dims 1..256 (tiles are padded to a power of two and masked), float16/bfloat16/float32.

    >>> kernel_supports(96, torch.bfloat16), kernel_supports(512, torch.bfloat16), kernel_supports(64, torch.float64)
    (True, False, False)
    """
    return 1 <= d <= 256 and dtype in KERNEL_DTYPES


def plan_splits(n_total: int, max_len: int, block_n: int, programs: int) -> tuple[int, int]:
    """Chunk length and number of chunks per segment, from host-side sizes only (no device sync).

    Aim for about ``programs`` non-empty programs in all: chunk ~ n_total / programs tokens,
    a multiple of block_n; the longest segment decides how many chunks the grid needs.

    >>> plan_splits(n_total=1000, max_len=600, block_n=64, programs=8)
    (128, 5)
    """
    chunk = max(block_n, -(-n_total // programs))
    chunk = -(-chunk // block_n) * block_n  # round up to whole tiles
    return chunk, max(1, -(-max_len // chunk))


@functools.lru_cache(maxsize=None)
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch (``minikv.gpu.triton_linear``) needs compute capability 9.0 (Hopper) or newer."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def check_pdl(device: torch.device) -> None:
    """Raise a ValueError saying why PDL cannot run on ``device`` (a CPU, or a GPU older than Hopper)."""
    if device.type != "cuda":
        raise ValueError(f"pdl=True needs a CUDA device of compute capability >= 9.0 (Hopper); got device {device}")
    if not pdl_supported(device.index or 0):
        cap = torch.cuda.get_device_capability(device.index or 0)
        raise ValueError(f"pdl=True needs compute capability >= 9.0 (Hopper); {torch.cuda.get_device_name(device)} "
                         f"has {cap[0]}.{cap[1]}")
