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
import warnings

import torch
import torch.nn.functional as F

from ..budget import check_int
from .base import DegenerateBudgetWarning, LayerInputs, Scorer


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
    _check_snapkv_params(window_size, kernel_size, pooling)
    _check_snapkv_tensors(queries, keys, window_size)
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
    top = s.max().item()  # NaN if any score is NaN: then every window token would score NaN too
    if not math.isfinite(top):
        raise ValueError("SnapKV scores are not finite: the queries or keys contain NaN or inf")
    window = torch.full((b, n_kv, w), top + 1, dtype=s.dtype, device=s.device)
    return torch.cat([s, window], dim=-1)  # (b, n_kv, L)


def _check_snapkv_params(window_size, kernel_size, pooling):
    check_int("window_size", window_size, minimum=1)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 1 (so pooling keeps the length), got {kernel_size!r}")
    if pooling not in ("avg", "max"):
        raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")


def _check_snapkv_tensors(queries, keys, window_size):
    for name, t in (("queries", queries), ("keys", keys)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if keys.dim() != 4 or queries.dim() != 4:
        raise ValueError(
            f"queries must be (b, H, w, d) and keys (b, n_kv, L, d); got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if queries.device != keys.device or queries.dtype != keys.dtype:
        raise ValueError(f"queries ({queries.dtype} on {queries.device}) and keys ({keys.dtype} on {keys.device}) "
                         "must share one dtype and one device")
    if queries.shape[0] != keys.shape[0] or queries.shape[3] != keys.shape[3] or 0 in keys.shape:
        raise ValueError(f"queries (b, H, w, d) and keys (b, n_kv, L, d) must agree in b >= 1 and d >= 1; "
                         f"got {tuple(queries.shape)} and {tuple(keys.shape)}")
    L = keys.shape[2]
    if L <= window_size:
        raise ValueError(
            f"SnapKV needs a context longer than its window: context length {L} <= window_size {window_size}; "
            f"use a longer context or a smaller window_size (< {L})"
        )
    if queries.shape[2] < window_size:
        raise ValueError(f"SnapKV needs the queries of the last {window_size} tokens, got {queries.shape[2]}")
    if queries.shape[1] == 0 or queries.shape[1] % keys.shape[1] != 0:
        raise ValueError(
            f"query heads ({queries.shape[1]}) must be a multiple of KV heads ({keys.shape[1]}) to form GQA groups"
        )


class SnapKV(Scorer):
    """Scorer: attention of the last ``window_size`` prompt tokens, pooled (see module docstring)."""

    def __init__(self, window_size: int = 64, kernel_size: int = 5, pooling: str = "avg"):
        _check_snapkv_params(window_size, kernel_size, pooling)
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

    def check_budget(self, n_kept: int, context_length: int) -> None:
        """Warn when the budget is smaller than the window: then only the tie-break among window tokens decides."""
        if n_kept < self.window_size:
            warnings.warn(
                f"degenerate budget: n_kept = {n_kept} tokens per head < SnapKV window_size = {self.window_size} "
                f"(context length {context_length}). All {self.window_size} window tokens score max + 1, so SnapKV's "
                "ranking cannot choose among them; minikv keeps the most recent ones (kvpress leaves it to torch.topk's "
                "tie order). Use a smaller window_size or a lower compression_ratio.",
                DegenerateBudgetWarning, stacklevel=3)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        if inputs.queries is None:
            raise ValueError("SnapKV needs the window queries: LayerInputs.queries is None")
        return snapkv_scores(inputs.queries, inputs.keys, self.window_size, self.kernel_size, self.pooling)
