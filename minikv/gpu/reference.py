"""The slow, obvious version: attention over a ragged cache, one head at a time, in float32.

This is the definition the Triton kernel must match (tests/test_gpu.py checks it):

    for each batch row r and query head h (KV head k = h // g):
        K_rk, V_rk = the tokens KV head k of row r holds, oldest first       # (n_rk, d)
        for each new token i of the q just appended (they are the last q of the n_rk):
            logits = (query[r, h, i] @ K_rk.T) * scaling                    # (n_rk,)
            logits[j] = -inf for j > n_rk - q + i                           # causal among the new
            out[r, h, i] = softmax(logits) @ V_rk                           # (d,)
"""

from __future__ import annotations

import torch


def ragged_attention(query: torch.Tensor, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]],
                     scaling: float) -> torch.Tensor:
    """query (b, H, q, d); keys[r][k], values[r][k] (n_rk, d) -> (b, H, q, d) in float32."""
    b, H, q, d = query.shape
    n_kv = len(keys[0])
    g = H // n_kv
    out = torch.empty(b, H, q, d, dtype=torch.float32, device=query.device)
    for r in range(b):
        for h in range(H):
            k, v = keys[r][h // g].float(), values[r][h // g].float()  # (n, d)
            n = k.shape[0]
            logits = (query[r, h].float() @ k.T) * scaling  # (q, n)
            seen = torch.arange(n, device=k.device)[None, :] <= (n - q + torch.arange(q, device=k.device))[:, None]
            logits = logits.masked_fill(~seen, float("-inf"))
            out[r, h] = torch.softmax(logits, dim=-1) @ v  # (q, d)
    return out


def segments_from_selection(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor):
    """(b, n_kv, L, d) tensors and a (b, n_kv, L) keep mask -> nested lists of each head's kept tokens."""
    b, n_kv = keep.shape[:2]
    ks = [[keys[r, k][keep[r, k]] for k in range(n_kv)] for r in range(b)]
    vs = [[values[r, k][keep[r, k]] for k in range(n_kv)] for r in range(b)]
    return ks, vs


def append_segments(ks, vs, new_keys: torch.Tensor, new_values: torch.Tensor):
    """Append (b, n_kv, q, d) new tokens to every head of the nested lists."""
    ks = [[torch.cat([k, new_keys[r, j]]) for j, k in enumerate(row)] for r, row in enumerate(ks)]
    vs = [[torch.cat([v, new_values[r, j]]) for j, v in enumerate(row)] for r, row in enumerate(vs)]
    return ks, vs
