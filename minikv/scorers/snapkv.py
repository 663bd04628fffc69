"""SnapKV (Li et al., 2024, arXiv 2404.14469): score tokens by the attention of the prompt's last window.

The idea (SnapKV Sec. 3): the last few tokens of a prompt already "know" what the model will look
for while it answers, so the attention they pay to earlier tokens predicts which tokens matter.

Steps, as kvpress computes them (defaults w = 64, kernel 5):

    A = softmax(Q_win K^T / sqrt(d))          (b, H, w, L)   causal inside the window, float32
    s = mean over the w window rows of A[..., :L-w]          (b, H, L-w)
    s = avg_pool1d(s, kernel, stride 1, zero padding)        (b, H, L-w)
    s = mean over the g query heads of each KV head          (b, n_kv, L-w)
    scores = [s, max(s) + 1 for the w window tokens]         (b, n_kv, L)

The original repository uses w = 32 and *max* pooling of size 7 and repeats K/V for GQA;
``SnapKV(window_size=32, kernel_size=7, pooling="max")`` gives its pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import LayerInputs, Scorer


def window_attention(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the w window queries over all L keys, causal inside the window.

    queries (b, H, w, d), keys (b, n_kv, L, d) -> (b, H, w, L), in the queries' dtype.
    Window row i is the token at position L - w + i: it sees keys 0 .. L - w + i.
    """
    b, H, w, d = queries.shape
    n_kv, L = keys.shape[1], keys.shape[2]
    g = H // n_kv
    # each KV head serves its g query heads: fold them into the row axis instead of copying K
    q = queries.reshape(b, n_kv, g * w, d)  # (b, n_kv, g*w, d)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (b, n_kv, g*w, L)
    logits = logits.reshape(b, H, w, L)  # (b, H, w, L)
    row_pos = torch.arange(L - w, L, device=keys.device)[:, None]  # (w, 1)
    col_pos = torch.arange(L, device=keys.device)[None, :]  # (1, L)
    logits = logits.masked_fill(col_pos > row_pos, float("-inf"))
    return torch.softmax(logits.float(), dim=-1).to(queries.dtype)  # (b, H, w, L)


def snapkv_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    window_size: int = 64,
    kernel_size: int = 5,
    pooling: str = "avg",
) -> torch.Tensor:
    """SnapKV scores on plain tensors.

    queries: (b, H, w', d) post-RoPE queries of the last w' >= window_size context tokens
    keys:    (b, n_kv, L, d) post-RoPE keys, L > window_size
    returns  (b, n_kv, L); the last window_size tokens score max + 1, so they are kept first.

    >>> q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 20, 16)
    >>> snapkv_scores(q, k, window_size=8).shape
    torch.Size([1, 2, 20])
    """
    _check_snapkv_args(queries, keys, window_size, kernel_size, pooling)
    b, H = queries.shape[:2]
    n_kv, L = keys.shape[1], keys.shape[2]
    w, g = window_size, H // n_kv
    attn = window_attention(queries[:, :, -w:], keys)  # (b, H, w, L)
    s = attn[..., : L - w].mean(dim=2)  # (b, H, L-w): no renormalisation after dropping the window
    if pooling == "avg":  # zero padding, edges still divided by kernel_size
        s = F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    else:
        s = F.max_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2)
    s = s.reshape(b, n_kv, g, L - w).mean(dim=2)  # (b, n_kv, L-w): GQA group mean
    window = torch.full((b, n_kv, w), s.max().item() + 1, dtype=s.dtype, device=s.device)
    return torch.cat([s, window], dim=-1)  # (b, n_kv, L)


def _check_snapkv_args(queries, keys, window_size, kernel_size, pooling):
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1 (so pooling keeps the length), got {kernel_size!r}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
    if keys.dim() != 4 or queries.dim() != 4:
        raise ValueError(
            f"queries must be (b, H, w, d) and keys (b, n_kv, L, d); got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    L = keys.shape[2]
    if L <= window_size:
        raise ValueError(
            f"SnapKV needs a context longer than its window: context length {L} <= window_size {window_size}; "
            f"use a longer context or a smaller window_size (< {L})"
        )
    if queries.shape[2] < window_size:
        raise ValueError(f"SnapKV needs the queries of the last {window_size} tokens, got {queries.shape[2]}")
    if queries.shape[1] % keys.shape[1] != 0:
        raise ValueError(
            f"query heads ({queries.shape[1]}) must be a multiple of KV heads ({keys.shape[1]}) to form GQA groups"
        )


class SnapKV(Scorer):
    """Scorer: attention of the last ``window_size`` prompt tokens, pooled (see module docstring)."""

    def __init__(self, window_size: int = 64, kernel_size: int = 5, pooling: str = "avg"):
        _check_snapkv_args(torch.zeros(1, 1, window_size, 1), torch.zeros(1, 1, window_size + 1, 1),
                           window_size, kernel_size, pooling)
        self.window_size = window_size
        self.kernel_size = kernel_size
        self.pooling = pooling

    @property
    def needs_queries(self) -> int:
        return self.window_size

    def check(self, context_length: int) -> None:
        if context_length <= self.window_size:
            raise ValueError(
                f"SnapKV needs a context longer than its window: context length {context_length} <= "
                f"window_size {self.window_size}; use a longer context or a smaller window_size"
            )

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        if inputs.queries is None:
            raise ValueError("SnapKV needs the window queries: LayerInputs.queries is None")
        return snapkv_scores(inputs.queries, inputs.keys, self.window_size, self.kernel_size, self.pooling)
