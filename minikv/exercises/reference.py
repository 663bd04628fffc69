"""minikv's answer to every exercise, with the exercise's own signature: the oracle the checkers compare to.

Each function is built from the library (``minikv.scorers``, ``minikv.policies``, ``minikv.budget``)
wherever the library has the piece, so the checkers test the learner against the same code that
the presses run. A learner may call these to see what a right answer looks like.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..budget import head_ceiling, n_kept as kept_count, n_safe as safe_floor
from ..policies import CriticalAdaKV, adakv_keep_mask, projected_value_norm, topk_mask
from ..scorers import LayerInputs, window_attention

__all__ = ["window_scores", "pool_group_window", "uniform_keep_mask", "safeguard", "adakv_keep_mask",
           "floor_ceiling", "projected_value_norm", "critical_adakv_keep_mask", "append_token",
           "ragged_attention", "to_ragged", "dense_masked_attention"]


# 01 ---------------------------------------------------------------------------------------------
def window_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(b, H, w, d), (b, n_kv, L, d) -> (b, H, L-w): mean attention of the window rows on the prefix keys."""
    w, L = queries.shape[2], keys.shape[2]
    return window_attention(queries, keys)[..., : L - w].mean(dim=2)  # (b, H, L-w)


# 02 ---------------------------------------------------------------------------------------------
def pool_group_window(s: torch.Tensor, n_kv: int, window_size: int, kernel_size: int = 5) -> torch.Tensor:
    """(b, H, L-w) window scores -> (b, n_kv, L) SnapKV scores: avg-pool, group mean, window = max + 1."""
    b, H, n = s.shape
    s = F.avg_pool1d(s, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True)
    s = s.reshape(b, n_kv, H // n_kv, n).mean(dim=2)  # (b, n_kv, L-w)
    return torch.cat([s, (s.max() + 1).expand(b, n_kv, window_size).to(s.dtype)], dim=-1)  # (b, n_kv, L)


# 03 ---------------------------------------------------------------------------------------------
def uniform_keep_mask(scores: torch.Tensor, n_kept: int) -> torch.Tensor:
    """(b, n_kv, L) -> bool mask keeping each (row, head)'s own top n_kept."""
    return topk_mask(scores, n_kept)


# 04 ---------------------------------------------------------------------------------------------
def safeguard(scores: torch.Tensor, n_kept: int, alpha_safeguard: float = 0.2) -> torch.Tensor:
    """(b, n_kv, L) -> a copy whose top n_safe = max(1, floor(alpha * n_kept)) per head hold the dtype's max."""
    top = scores.topk(safe_floor(n_kept, alpha_safeguard), dim=-1).indices
    return scores.scatter(-1, top, torch.finfo(scores.dtype).max)


# 06 ---------------------------------------------------------------------------------------------
def floor_ceiling(context_length: int, compression_ratio: float, n_kv: int,
                  alpha_safeguard: float = 0.2) -> tuple[int, int]:
    """Fewest and most tokens one KV head can keep under AdaKV."""
    k = kept_count(context_length, compression_ratio)
    s = safe_floor(k, alpha_safeguard)
    return s, head_ceiling(k, s, n_kv, context_length)


# 08 ---------------------------------------------------------------------------------------------
def critical_adakv_keep_mask(scores, values, o_proj, n_kept: int, alpha_safeguard: float = 0.2,
                             epsilon: float = 1e-4, first_stage_ratio: float = 0.5) -> torch.Tensor:
    """CriticalAdaKV's keep mask: AdaKV budgets per row, then two stages inside each head."""
    press = CriticalAdaKV(None, 0.0, alpha_safeguard, epsilon, first_stage_ratio)
    return press.keep_mask(scores, LayerInputs(values, values, None, o_proj), n_kept)[0]


# 09 ---------------------------------------------------------------------------------------------
def to_ragged(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor):
    """Dense (b, n_kv, L, d) keys/values + (b, n_kv, L) keep mask -> ragged cache.

    Returns two lists of b lists of n_kv tensors: keys[r][h] is (n_h, d) with n_h = keep[r, h].sum().
    """
    b, n_kv = keep.shape[:2]
    ks = [[keys[r, h][keep[r, h]] for h in range(n_kv)] for r in range(b)]
    vs = [[values[r, h][keep[r, h]] for h in range(n_kv)] for r in range(b)]
    return ks, vs


def append_token(keys, values, k_new: torch.Tensor, v_new: torch.Tensor):
    """Append one token ((b, n_kv, d) key and value) at the end of every head of a ragged cache."""
    ks = [[torch.cat([k, k_new[r, h, None]]) for h, k in enumerate(row)] for r, row in enumerate(keys)]
    vs = [[torch.cat([v, v_new[r, h, None]]) for h, v in enumerate(row)] for r, row in enumerate(values)]
    return ks, vs


def dense_masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           keep: torch.Tensor) -> torch.Tensor:
    """One query per head, (b, H, d), over dense (b, n_kv, L, d) keys whose evicted tokens are masked to -inf."""
    b, H, d = query.shape
    n_kv = keys.shape[1]
    q = query.reshape(b, n_kv, H // n_kv, d)  # (b, n_kv, g, d): query head h uses KV head h // g
    logits = q @ keys.transpose(-1, -2) / math.sqrt(d)  # (b, n_kv, g, L)
    logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
    return (torch.softmax(logits.float(), dim=-1).to(values.dtype) @ values).reshape(b, H, d)


def ragged_attention(query: torch.Tensor, keys, values) -> torch.Tensor:
    """(b, H, d) queries over a ragged cache -> (b, H, d): each KV head attends over its own tokens only.

    Computed as dense attention with the missing tokens masked, which is what it must equal.
    """
    n = max(k.shape[0] for row in keys for k in row)
    pad = [[F.pad(k, (0, 0, 0, n - k.shape[0])) for k in row] for row in keys]
    pad_v = [[F.pad(v, (0, 0, 0, n - v.shape[0])) for v in row] for row in values]
    keep = torch.tensor([[[i < k.shape[0] for i in range(n)] for k in row] for row in keys])  # (b, n_kv, n)
    dense_k = torch.stack([torch.stack(row) for row in pad])  # (b, n_kv, n, d)
    dense_v = torch.stack([torch.stack(row) for row in pad_v])
    return dense_masked_attention(query, dense_k, dense_v, keep)
