"""Attention-output fidelity: how much does evicting tokens change what a layer outputs?

The Ada-KV paper (Feng et al., 2024, arXiv 2407.11550, Sec. 3) bounds the L1 error of one head's
attention output by twice the attention mass that head loses to eviction; CriticalKV (Feng et al.,
2025, arXiv 2502.03805) adds the values' projection through W_o. This module computes the pieces
those arguments talk about, in float32 on plain tensors:

* :func:`causal_attention` -- softmax attention of some queries over keys, with evicted tokens hidden;
* :func:`projected_values` -- u_i = v_i W_o^h, what token i adds to the layer's output through head h.
"""

from __future__ import annotations

import torch


def causal_attention(queries: torch.Tensor, keys: torch.Tensor, q_start: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention in float32: queries (b, H, m, d), keys (b, n_kv, T, d) -> (b, H, m, T).

    Query row j sits at position q_start + j and sees keys 0 .. q_start + j. ``keep`` (b, n_kv, T),
    bool, hides evicted tokens; each head renormalises over what it kept, as a compressed cache does.

    >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4)
    >>> a = causal_attention(q, k, q_start=2); a.shape, bool(a[0, 0, 0, 3:].eq(0).all())
    (torch.Size([1, 2, 3, 5]), True)
    """
    b, H, m, d = queries.shape
    g = H // keys.shape[1]
    logits = queries.float() @ keys.float().repeat_interleave(g, dim=1).transpose(-1, -2) / d ** 0.5  # (b, H, m, T)
    T = keys.shape[2]
    visible = torch.arange(T, device=keys.device) <= q_start + torch.arange(m, device=keys.device)[:, None]  # (m, T)
    if keep is not None:
        visible = visible & keep.to(keys.device).repeat_interleave(g, dim=1)[:, :, None, :]  # (b, H, m, T)
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def projected_values(values: torch.Tensor, o_proj: torch.Tensor) -> torch.Tensor:
    """u_i = v_i W_o^h: what token i adds to the layer's output through query head h.

    values (b, n_kv, T, d), o_proj weight (hidden, H*d) -> (b, H, T, hidden), float32.
    """
    n_kv, d = values.shape[1], values.shape[3]
    H = o_proj.shape[1] // d
    w_o = o_proj.float().T.reshape(H, d, -1)  # (H, d, hidden): head h's block of W_o
    return torch.einsum("bhtd,hdo->bhto", values.float().repeat_interleave(H // n_kv, dim=1), w_o)
