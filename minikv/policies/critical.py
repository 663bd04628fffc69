"""CriticalKV and CriticalAdaKV (Feng et al., 2025, arXiv 2502.03805): rank by output perturbation.

Attention weight alone is not what matters: evicting token i changes a head's output by
roughly  a_i * (v_i W_o),  its attention weight times its value pushed through the output
projection. A token with small attention but a large ||v_i W_o|| can matter more than one
with larger attention and a tiny value. So, with the projected value norm

    N[k, i] = mean over the g query heads h of KV head k of || v[k, i] @ W_o[h] ||_1

the second stage ranks tokens by (score + eps) * N. Because the scorer's weights are only
estimates, a first stage protects each head's top tokens by the base score alone (half
the budget by default), and the second stage fills the rest of the budget.
"""

from __future__ import annotations

import torch

from ..budget import check_alpha, check_number, n_safe as safe_floor
from .adakv import adakv_budgets
from .base import Press, topk_mask, topk_mask_per_head


MAX_TEMP_ELEMENTS = 2 ** 26  # float32 elements of v W_o held at once (256 MB; an 8B model at 8 x 32k needed 32 GiB)


def projected_value_norm(values: torch.Tensor, o_proj: torch.Tensor) -> torch.Tensor:
    """N[b, k, i] = mean_{h in group k} || values[b, k, i] @ W_o[h] ||_1.

    values (b, n_kv, L, d); o_proj (hidden, H * d), the nn.Linear weight (y = x @ o_proj.T)
    returns (b, n_kv, L) in float32.
    """
    b, n_kv, L, d = values.shape
    hidden, Hd = o_proj.shape
    if Hd % (n_kv * d) != 0:  # LayerInputs checks this too; here for direct calls on plain tensors
        raise ValueError(f"o_proj must have shape (hidden, H * d) with H a multiple of n_kv = {n_kv} and "
                         f"d = {d} (the values' head dim), got {tuple(o_proj.shape)}")
    H = Hd // d
    g = H // n_kv
    # column block h of o_proj maps head h's d outputs into the hidden state
    w_o = o_proj.float().T.reshape(n_kv, g, d, hidden)  # (n_kv, g, d, hidden)
    step = max(1, MAX_TEMP_ELEMENTS // (b * n_kv * hidden))  # tokens at a time: (b, n_kv, step, hidden) float32
    norms = []
    for j in range(g):  # one query head of each group at a time
        parts = []
        for t0 in range(0, L, step):
            v_wo = values[:, :, t0:t0 + step].float() @ w_o[None, :, j]  # (b, n_kv, <= step, hidden)
            parts.append(v_wo.abs().sum(dim=-1))  # L1 norm over hidden
        norms.append(torch.cat(parts, dim=-1))  # (b, n_kv, L)
    return torch.stack(norms).mean(dim=0)  # (b, n_kv, L)


def _need_o_proj(inputs):
    if inputs.o_proj is None:
        raise ValueError("CriticalKV needs the output projection: LayerInputs.o_proj is None")
    return inputs.o_proj


def critical_scores(scores, values, o_proj, protected, epsilon=1e-4):
    """Stage 2 score (score + eps) * N, with the stage-1 ``protected`` tokens forced to the top."""
    n = projected_value_norm(values, o_proj)  # (b, n_kv, L)
    out = (scores.float() + epsilon) * n
    return out.masked_fill(protected, torch.finfo(out.dtype).max)


class CriticalKV(Press):
    """Uniform budgets, two-stage selection (kvpress's ``critical_snapkv`` when wrapping SnapKV).

    Stage 1: each head keeps its top b1 = max(1, floor((1 - cr) * L * first_stage_ratio)) by base score.
    Stage 2: the rest of its n_kept tokens by (score + eps) * ||v W_o||_1.
    """

    def __init__(self, scorer, compression_ratio: float = 0.0, epsilon: float = 1e-4, first_stage_ratio: float = 0.5):
        super().__init__(scorer, compression_ratio)
        self.epsilon = check_number("epsilon", epsilon, lo=0)
        self.first_stage_ratio = check_number("first_stage_ratio", first_stage_ratio, lo=0, hi=1)

    def keep_mask(self, scores, inputs, n_kept):
        L = inputs.context_length
        b1 = max(1, int((1 - self.compression_ratio) * L * self.first_stage_ratio))
        protected = topk_mask(scores, min(b1, n_kept))  # stage 1
        stage2 = critical_scores(scores, inputs.values, _need_o_proj(inputs), protected, self.epsilon)
        return topk_mask(stage2, n_kept), 0

    def _extra_repr(self):
        return f", epsilon={self.epsilon}, first_stage_ratio={self.first_stage_ratio}"


class CriticalAdaKV(Press):
    """AdaKV budgets, then CriticalKV's two stages inside each head (kvpress's ``critical_adakv_snapkv``).

    1. B[r, h] = tokens head h of row r would keep under AdaKV (safeguard + global Top-K on base scores);
    2. stage 1 protects the head's top max(n_safe, floor(B * first_stage_ratio)) tokens by base score
       (kvpress keeps the safeguard's max scores through stage 2, hence the max);
    3. stage 2 fills the head up to B by (score + eps) * ||v W_o||_1.
    Budgets are computed per batch row (kvpress sums them over the batch, which is wrong for b > 1).
    """

    def __init__(self, scorer, compression_ratio: float = 0.0, alpha_safeguard: float = 0.2,
                 epsilon: float = 1e-4, first_stage_ratio: float = 0.5):
        super().__init__(scorer, compression_ratio)
        self.alpha_safeguard = check_alpha(alpha_safeguard)
        self.epsilon = check_number("epsilon", epsilon, lo=0)
        self.first_stage_ratio = check_number("first_stage_ratio", first_stage_ratio, lo=0, hi=1)

    def keep_mask(self, scores, inputs, n_kept):
        n_safe = safe_floor(n_kept, self.alpha_safeguard)
        budgets = adakv_budgets(scores, n_kept, self.alpha_safeguard)  # (b, n_kv)
        stage1 = torch.clamp((budgets * self.first_stage_ratio).long(), min=n_safe)  # (b, n_kv)
        protected = topk_mask_per_head(scores, stage1)
        stage2 = critical_scores(scores, inputs.values, _need_o_proj(inputs), protected, self.epsilon)
        return topk_mask_per_head(stage2, budgets), n_safe

    def _extra_repr(self):
        return f", alpha_safeguard={self.alpha_safeguard}, epsilon={self.epsilon}, first_stage_ratio={self.first_stage_ratio}"
