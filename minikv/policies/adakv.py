"""AdaKV (Feng et al., 2024, arXiv 2407.11550): one budget per layer, shared across KV heads.

Uniform selection gives each head n_kept tokens. AdaKV instead keeps the n_kv * n_kept
highest-scoring (head, token) *pairs* of the whole layer -- the same total, split unevenly:
a head whose attention is spread over many tokens gets more, a head that only looks at a
few recent tokens gets fewer. Why this is the right thing (Ada-KV Sec. 3.2, Theorem 1):
the L1 error of a head's output after eviction is at most 2 * (attention mass it evicted),
so keeping the globally largest scores minimises the layer's bound for the same budget.

The safeguard (Sec. 3.3 with GQA): first give every head its own top n_safe = floor(alpha * n_kept)
tokens, so no head is starved when the scores of different heads are on different scales.

Worked example (lesson 02): 4 KV heads, L = 100, cr = 0.5 -> n_kept = 50, n_safe = 10;
uniform keeps 50/50/50/50, AdaKV e.g. 70/40/60/30 -- 200 pairs either way, every head >= 10.
"""

from __future__ import annotations

import torch

from ..budget import check_alpha, n_safe as safe_floor
from .base import Press, topk_mask


def adakv_keep_mask(scores: torch.Tensor, n_kept: int, alpha_safeguard: float = 0.2) -> torch.Tensor:
    """AdaKV selection on plain tensors: (b, n_kv, L) scores -> (b, n_kv, L) keep mask.

    1. safeguard: each head's top n_safe tokens get the dtype's max score;
    2. per batch row, keep the n_kv * n_kept largest scores over all (head, token) pairs.
    Exact ties (SnapKV's window, the safeguard's max) go to the most recent token, then the lower head.
    """
    b, n_kv, L = scores.shape
    n_safe = safe_floor(n_kept, alpha_safeguard)
    scores = scores.masked_fill(topk_mask(scores, n_safe), torch.finfo(scores.dtype).max)
    flat = scores.reshape(b, n_kv * L)  # (b, n_kv*L): heads side by side, one budget per row
    positions = torch.arange(L, device=scores.device).repeat(n_kv)  # (n_kv*L,) token position of each pair
    return topk_mask(flat, n_kv * n_kept, positions).reshape(b, n_kv, L)


def adakv_budgets(scores: torch.Tensor, n_kept: int, alpha_safeguard: float = 0.2) -> torch.Tensor:
    """Per-(row, head) budgets B_h that AdaKV's global selection gives: (b, n_kv) ints summing to n_kv * n_kept."""
    return adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(dim=-1)


class AdaKV(Press):
    """Head-wise adaptive budgets around any scorer: ``AdaKV(SnapKV(), compression_ratio=0.5)``."""

    def __init__(self, scorer, compression_ratio: float = 0.0, alpha_safeguard: float = 0.2):
        super().__init__(scorer, compression_ratio)
        self.alpha_safeguard = check_alpha(alpha_safeguard)

    def keep_mask(self, scores, inputs, n_kept):
        return adakv_keep_mask(scores, n_kept, self.alpha_safeguard), safe_floor(n_kept, self.alpha_safeguard)

    def _extra_repr(self):
        return f", alpha_safeguard={self.alpha_safeguard}"
