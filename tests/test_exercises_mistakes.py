"""Learner-style wrong implementations of every exercise: each must be rejected with ExerciseFailure.

They are written the way a learner might write them, independently of the checkers' own catalogue
of mistakes (``minikv.exercises.*.*_MISTAKES``). Where the catalogue holds the mistake, the message
must carry exactly that hint (idea first, then code); where it does not, no catalogued hint may
appear -- a hint that merely also differs from the right answer would mislead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minikv.exercises import (ExerciseFailure, check_adakv_selection, check_critical_adakv, check_floor_ceiling,
                              check_pooling, check_ragged_append, check_ragged_attention, check_safeguard,
                              check_topk_per_head, check_uniform_topk, check_value_norm, check_window_scores,
                              reference)
from minikv.exercises import ragged, scoring, selection
from minikv.exercises._check import LAST_RUN, _run, diagnose, same
from minikv.policies import adakv_keep_mask, projected_value_norm, topk_mask_per_head

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a thread pool only adds overhead (the checkers themselves run on one thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CATALOGUE = {
    check_window_scores: scoring.WINDOW_MISTAKES, check_pooling: scoring.POOL_MISTAKES,
    check_value_norm: scoring.NORM_MISTAKES, check_uniform_topk: selection.UNIFORM_MISTAKES,
    check_safeguard: selection.SAFEGUARD_MISTAKES, check_adakv_selection: selection.ADAKV_MISTAKES,
    check_floor_ceiling: selection.BOUNDS_MISTAKES, check_topk_per_head: selection.PER_HEAD_MISTAKES,
    check_critical_adakv: selection.CRITICAL_MISTAKES, check_ragged_append: ragged.APPEND_MISTAKES,
    check_ragged_attention: ragged.ATTENTION_MISTAKES,
}


# -- 01 window scores ------------------------------------------------------------------------------


def _logits(queries, keys, repeat="interleave"):
    g = queries.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1) if repeat == "interleave" else keys.repeat(1, g, 1, 1)
    return queries @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1])  # (b, H, w, L)


def _causal(logits, w, L, offset=0):
    row = torch.arange(L - w, L)[:, None] + offset
    return logits.masked_fill(torch.arange(L)[None, :] > row, float("-inf"))


def window_no_causal_mask(queries, keys):
    g = queries.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(g, dim=1)
    attn = torch.softmax(queries @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1]), dim=-1)
    return attn[..., : keys.shape[2] - queries.shape[2]].mean(2)


def window_all_columns(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    k = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
    logits = queries @ k.transpose(-1, -2) / math.sqrt(queries.shape[-1])
    logits = logits.masked_fill(torch.ones(w, L, dtype=torch.bool).triu(L - w + 1), float("-inf"))
    return torch.softmax(logits, dim=-1).mean(2)  # forgot to drop the window columns


def window_mask_own_position(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    row = torch.arange(L - w, L)[:, None]
    logits = _logits(queries, keys).masked_fill(torch.arange(L)[None, :] >= row, float("-inf"))  # >= : off by one
    return torch.softmax(logits.float(), -1).to(queries.dtype)[..., : L - w].mean(2)


def window_square_triu(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    mask = torch.triu(torch.ones(w, L, dtype=torch.bool), diagonal=1)  # as for a square (L, L) matrix
    logits = _logits(queries, keys).masked_fill(mask, float("-inf"))
    return torch.softmax(logits.float(), -1).to(queries.dtype)[..., : L - w].mean(2)


def window_softmax_over_rows(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries, keys), w, L).float(), dim=2)  # wrong axis
    return attn.to(queries.dtype)[..., : L - w].mean(2)


def window_repeat_not_interleave(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries, keys, repeat="tile"), w, L).float(), -1)
    return attn.to(queries.dtype)[..., : L - w].mean(2)


def window_unscaled(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    g = queries.shape[1] // keys.shape[1]
    logits = queries @ keys.repeat_interleave(g, 1).transpose(-1, -2)
    attn = torch.softmax(_causal(logits, w, L).float(), -1)
    return attn.to(queries.dtype)[..., : L - w].mean(2)


def window_float32_result(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries.float(), keys.float()), w, L), -1)  # never cast back
    return attn[..., : L - w].mean(2)


def window_renormalised(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries, keys), w, L).float(), -1)[..., : L - w]
    attn = attn / attn.sum(-1, keepdim=True)
    return attn.to(queries.dtype).mean(2)


def window_last_columns(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries, keys), w, L).float(), -1).to(queries.dtype)
    return attn[..., w:].mean(2)


def window_scales_queries_in_place(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    queries /= math.sqrt(queries.shape[-1])  # edits the caller's tensor
    g = queries.shape[1] // keys.shape[1]
    logits = queries @ keys.repeat_interleave(g, 1).transpose(-1, -2)
    attn = torch.softmax(_causal(logits, w, L).float(), -1).to(queries.dtype)
    return attn[..., : L - w].mean(2)


def window_sum_over_rows(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries, keys), w, L).float(), -1).to(queries.dtype)
    return attn[..., : L - w].sum(2)


# -- 02 pooling ------------------------------------------------------------------------------------


def _finish(p, window_size):
    """Append the window tokens the right way: max + 1 over everything, in p's dtype."""
    b, n_kv = p.shape[:2]
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item() + 1, dtype=p.dtype)], dim=-1)


def pool_no_padding(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, stride=1).reshape(b, n_kv, H // n_kv, -1).mean(2)
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item() + 1)], dim=-1)


def pool_group_max(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).max(dim=2).values
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item() + 1)], dim=-1)


def pool_exclude_padding(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2, count_include_pad=False)
    return _finish(p.reshape(b, n_kv, H // n_kv, n).mean(2), window_size)


def pool_padding_two(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, padding=2)  # right for kernel 5 only
    return _finish(p.reshape(b, n_kv, H // n_kv, -1).mean(2), window_size)


def pool_window_max_per_head(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).mean(2)
    window = (p.amax(dim=-1, keepdim=True) + 1).expand(b, n_kv, window_size)
    return torch.cat([p, window], dim=-1)


def pool_window_equals_max(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).mean(2)
    return torch.cat([p, torch.full((b, n_kv, window_size), p.max().item(), dtype=p.dtype)], dim=-1)


def pool_window_infinite(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).mean(2)
    return torch.cat([p, torch.full((b, n_kv, window_size), float("inf"), dtype=p.dtype)], dim=-1)


def pool_window_float32(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2).reshape(b, n_kv, H // n_kv, n).mean(2)
    window = torch.full((b, n_kv, window_size), p.max().item() + 1)  # float32, whatever s is
    return torch.cat([p.float(), window], dim=-1)


def pool_original_repo(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.max_pool1d(s, 7, 1, 3)  # the original SnapKV repository's pooling, kernel_size ignored
    return _finish(p.reshape(b, n_kv, H // n_kv, n).mean(2), window_size)


def pool_view_order(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    p = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2)
    p = p.view(b, H // n_kv, n_kv, n).mean(1)  # groups every n_kv-th head
    return _finish(p, window_size)


def pool_in_place(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    s[:] = F.avg_pool1d(s, kernel_size, 1, kernel_size // 2)  # overwrites the caller's scores
    return _finish(s.reshape(b, n_kv, H // n_kv, n).mean(2), window_size)


# -- 03 uniform Top-K ------------------------------------------------------------------------------


def uniform_global(scores, n_kept):
    b, n_kv, L = scores.shape
    idx = scores.reshape(b, -1).topk(n_kv * n_kept).indices
    return torch.zeros(b, n_kv * L, dtype=torch.bool).scatter(1, idx, True).reshape(b, n_kv, L)


def uniform_int_mask(scores, n_kept):
    return torch.zeros_like(scores, dtype=torch.long).scatter(-1, scores.topk(n_kept).indices, 1)


def uniform_indices(scores, n_kept):
    return scores.topk(n_kept).indices


def uniform_threshold(scores, n_kept):
    kth = scores.sort(dim=-1, descending=True).values[..., n_kept - 1 : n_kept]  # (b, n_kv, 1)
    return scores >= kth


def uniform_ascending(scores, n_kept):
    idx = scores.argsort(dim=-1)[..., :n_kept]  # argsort is ascending: these are the smallest
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def uniform_strictly_above_next(scores, n_kept):
    L = scores.shape[-1]
    if n_kept == L:
        return torch.ones_like(scores, dtype=torch.bool)
    nxt = scores.sort(dim=-1, descending=True).values[..., n_kept : n_kept + 1]
    return scores > nxt  # fewer than n_kept when the n_kept-th and the next tie


def uniform_greedy_in_place(scores, n_kept):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for _ in range(n_kept):
        idx = scores.argmax(dim=-1, keepdim=True)
        keep.scatter_(-1, idx, True)
        scores.scatter_(-1, idx, float("-inf"))  # marks the caller's scores
    return keep


# -- 04 safeguard ----------------------------------------------------------------------------------


def safeguard_rounding(scores, n_kept, alpha_safeguard=0.2):
    n = max(1, round(n_kept * alpha_safeguard)) if alpha_safeguard else 0
    out = scores.clone()
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            out[r, h, scores[r, h].topk(n).indices] = torch.finfo(scores.dtype).max
    return out


def _n_safe(n_kept, alpha):
    return max(1, int(alpha * n_kept)) if alpha > 0 else 0


def safeguard_in_place(scores, n_kept, alpha_safeguard=0.2):
    idx = scores.topk(_n_safe(n_kept, alpha_safeguard), dim=-1).indices
    return scores.scatter_(-1, idx, torch.finfo(scores.dtype).max)  # scatter_ edits the input


def safeguard_infinity(scores, n_kept, alpha_safeguard=0.2):
    idx = scores.topk(_n_safe(n_kept, alpha_safeguard), dim=-1).indices
    return scores.scatter(-1, idx, float("inf"))


def safeguard_float32_max(scores, n_kept, alpha_safeguard=0.2):
    out = scores.clone()
    idx = scores.topk(_n_safe(n_kept, alpha_safeguard), dim=-1).indices
    out[torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)] = torch.finfo(torch.float32).max
    return out  # fine in float32; inf in float16 / bfloat16


def safeguard_always_one(scores, n_kept, alpha_safeguard=0.2):
    n = max(1, int(alpha_safeguard * n_kept))  # forgets that alpha = 0 means no safeguard
    return scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)


def safeguard_no_minimum(scores, n_kept, alpha_safeguard=0.2):
    n = int(alpha_safeguard * n_kept)
    return scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)


def safeguard_alpha_times_length(scores, n_kept, alpha_safeguard=0.2):
    n = _n_safe(scores.shape[-1], alpha_safeguard)  # alpha applied to L instead of n_kept
    return scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)


def safeguard_threshold(scores, n_kept, alpha_safeguard=0.2):
    n = _n_safe(n_kept, alpha_safeguard)
    if n == 0:
        return scores.clone()
    kth = scores.topk(n, dim=-1).values[..., -1:]
    return scores.masked_fill(scores >= kth, torch.finfo(scores.dtype).max)


def safeguard_ceil(scores, n_kept, alpha_safeguard=0.2):
    n = max(1, math.ceil(alpha_safeguard * n_kept)) if alpha_safeguard > 0 else 0
    return scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)


def safeguard_smallest(scores, n_kept, alpha_safeguard=0.2):
    idx = scores.argsort(dim=-1)[..., : _n_safe(n_kept, alpha_safeguard)]
    return scores.scatter(-1, idx, torch.finfo(scores.dtype).max)


def safeguard_setitem_in_place(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    idx = scores.topk(_n_safe(n_kept, alpha_safeguard), dim=-1).indices  # (b, n_kv, n_safe)
    scores[torch.arange(b)[:, None, None], torch.arange(n_kv)[None, :, None], idx] = torch.finfo(scores.dtype).max
    return scores


# -- 05 AdaKV --------------------------------------------------------------------------------------


def _protect(scores, n_kept, alpha):
    return reference.safeguard(scores, n_kept, alpha)


def _mask_of(flat_idx, b, n_kv, L):
    return torch.zeros(b, n_kv * L, dtype=torch.bool).scatter(-1, flat_idx, True).reshape(b, n_kv, L)


def adakv_no_safeguard(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = scores.reshape(b, n_kv * L)
    return torch.zeros_like(flat, dtype=torch.bool).scatter(1, flat.topk(n_kv * n_kept).indices, True).reshape(
        b, n_kv, L)


def adakv_per_head(scores, n_kept, alpha_safeguard=0.2):
    protected = reference.safeguard(scores, n_kept, alpha_safeguard)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, protected.topk(n_kept).indices, True)


def adakv_whole_batch(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, alpha_safeguard).flatten()
    idx = flat.topk(b * n_kv * n_kept).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter(0, idx, True).reshape(b, n_kv, L)


def adakv_transposed_flatten(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, alpha_safeguard).transpose(1, 2).reshape(b, L * n_kv)
    return _mask_of(flat.topk(n_kv * n_kept, dim=-1).indices, b, n_kv, L)  # reshaped back without transposing


def adakv_default_alpha(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, 0.2).reshape(b, -1)  # the argument is never used
    return _mask_of(flat.topk(n_kv * n_kept, dim=-1).indices, b, n_kv, L)


def adakv_row_keeps_n_kept(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, alpha_safeguard).reshape(b, -1)
    return _mask_of(flat.topk(n_kept, dim=-1).indices, b, n_kv, L)


def adakv_threshold(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, alpha_safeguard).reshape(b, -1)
    cut = flat.sort(dim=-1, descending=True).values[:, n_kv * n_kept - 1, None]
    return (flat >= cut).reshape(b, n_kv, L)


def adakv_safeguard_in_place(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    scores.scatter_(-1, scores.topk(_n_safe(n_kept, alpha_safeguard), dim=-1).indices, torch.finfo(scores.dtype).max)
    return _mask_of(scores.reshape(b, -1).topk(n_kv * n_kept, dim=-1).indices, b, n_kv, L)


def adakv_round_safeguard(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    n = max(1, round(alpha_safeguard * n_kept)) if alpha_safeguard > 0 else 0
    protected = scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)
    return _mask_of(protected.reshape(b, -1).topk(n_kv * n_kept, dim=-1).indices, b, n_kv, L)


def adakv_safeguard_at_alpha_zero(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    n = max(1, int(alpha_safeguard * n_kept))  # protects one token per head even when alpha = 0
    protected = scores.scatter(-1, scores.topk(n, dim=-1).indices, torch.finfo(scores.dtype).max)
    return _mask_of(protected.reshape(b, -1).topk(n_kv * n_kept, dim=-1).indices, b, n_kv, L)


# -- 06 floor and ceiling --------------------------------------------------------------------------


def bounds_without_cap(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, int(L * (1 - compression_ratio)))
    n_safe = max(1, int(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, n_safe + n_kv * (n_kept - n_safe)


def _bounds(n_kept, L, n_kv, alpha):
    n_safe = max(1, int(n_kept * alpha)) if alpha > 0 else 0
    return n_safe, min(L, n_safe + n_kv * (n_kept - n_safe))


def bounds_round_kept(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    return _bounds(max(1, round(L * (1 - compression_ratio))), L, n_kv, alpha_safeguard)


def bounds_minus_removed(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    return _bounds(max(1, L - int(L * compression_ratio)), L, n_kv, alpha_safeguard)


def bounds_ceiling_all(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, int(L * (1 - compression_ratio)))
    n_safe = max(1, int(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, min(L, n_kv * n_kept)


def bounds_every_head_at_floor(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, int(L * (1 - compression_ratio)))
    n_safe = max(1, int(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, min(L, n_kv * n_kept - n_kv * n_safe)


def bounds_floor_at_alpha_zero(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, int(L * (1 - compression_ratio)))
    n_safe = max(1, int(n_kept * alpha_safeguard))
    return n_safe, min(L, n_safe + n_kv * (n_kept - n_safe))


def bounds_rounded_product(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    return _bounds(max(1, int(round(L * (1 - compression_ratio), 9))), L, n_kv, alpha_safeguard)


def bounds_no_minimum_kept(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = int(L * (1 - compression_ratio))
    n_safe = max(1, int(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, min(L, n_safe + n_kv * (n_kept - n_safe))


# -- 07 projected value norm -----------------------------------------------------------------------


def _blocks(values, o_proj):
    d = values.shape[-1]
    H = o_proj.shape[1] // d
    return H, H // values.shape[1], [o_proj[:, h * d:(h + 1) * d].float() for h in range(H)]  # (hidden, d) each


def value_norm_l2(values, o_proj):
    b, n_kv, L, d = values.shape
    H = o_proj.shape[1] // d
    g = H // n_kv
    out = torch.zeros(b, n_kv, L)
    for h in range(H):
        block = o_proj[:, h * d:(h + 1) * d].float()  # (hidden, d)
        out[:, h // g] += (values.float()[:, h // g] @ block.T).norm(dim=-1) / g
    return out


def value_norm_group_max(values, o_proj):
    b, n_kv, L, d = values.shape
    H = o_proj.shape[1] // d
    g = H // n_kv
    per_head = torch.stack([(values.float()[:, h // g] @ o_proj[:, h * d:(h + 1) * d].float().T).abs().sum(-1)
                            for h in range(H)], dim=1)  # (b, H, L)
    return per_head.reshape(b, n_kv, g, L).amax(2)


def value_norm_of_v(values, o_proj):
    return values.float().abs().sum(-1)  # ||v||_1, W_o never used


def value_norm_plain_reshape(values, o_proj):
    b, n_kv, L, d = values.shape
    hidden, H = o_proj.shape[0], o_proj.shape[1] // d
    w_o = o_proj.float().reshape(H, d, hidden)  # reinterprets memory: heads get mixed
    v = values.float().repeat_interleave(H // n_kv, dim=1)
    return (v @ w_o).abs().sum(-1).reshape(b, n_kv, H // n_kv, L).mean(2)


def value_norm_mean_abs(values, o_proj):
    b, n_kv, L, d = values.shape
    H, g, blocks = _blocks(values, o_proj)
    per_head = torch.stack([(values.float()[:, h // g] @ blocks[h].T).abs().mean(-1) for h in range(H)], 1)
    return per_head.reshape(b, n_kv, g, L).mean(2)


def value_norm_repeat(values, o_proj):
    b, n_kv, L, d = values.shape
    hidden, H = o_proj.shape[0], o_proj.shape[1] // d
    v = values.float().repeat(1, H // n_kv, 1, 1)  # tiles the KV heads: head h gets KV head h % n_kv
    per_head = (v @ o_proj.float().T.reshape(H, d, hidden)).abs().sum(-1)  # (b, H, L)
    return per_head.reshape(b, H // n_kv, n_kv, L).mean(1)


def value_norm_half_precision(values, o_proj):
    b, n_kv, L, d = values.shape
    hidden, H = o_proj.shape[0], o_proj.shape[1] // d
    v = values.repeat_interleave(H // n_kv, dim=1)
    per_head = (v @ o_proj.T.reshape(H, d, hidden)).abs().sum(-1)  # in the inputs' dtype
    return per_head.reshape(b, n_kv, H // n_kv, L).mean(2).float()


def value_norm_mean_of_blocks(values, o_proj):
    b, n_kv, L, d = values.shape
    H, g, blocks = _blocks(values, o_proj)
    out = []
    for k in range(n_kv):
        w_mean = sum(blocks[k * g + j] for j in range(g)) / g  # averages W_o before the norm
        out.append((values.float()[:, k] @ w_mean.T).abs().sum(-1))
    return torch.stack(out, dim=1)


def value_norm_keeps_dtype(values, o_proj):
    b, n_kv, L, d = values.shape
    hidden, H = o_proj.shape[0], o_proj.shape[1] // d
    v = values.repeat_interleave(H // n_kv, dim=1)
    per_head = (v @ o_proj.T.reshape(H, d, hidden)).abs().sum(-1)
    return per_head.reshape(b, n_kv, H // n_kv, L).mean(2)  # float16 in, float16 out


# -- 08 topk_per_head ------------------------------------------------------------------------------


def per_head_single_argsort(scores, budgets):
    order = scores.argsort(dim=-1, descending=True)
    return order < budgets[..., None]  # compares token *indices*, not ranks


def per_head_threshold(scores, budgets):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            B = int(budgets[r, h])
            if B > 0:
                keep[r, h] = scores[r, h] >= scores[r, h].sort(descending=True).values[B - 1]
    return keep


def per_head_largest_budget(scores, budgets):
    k = int(budgets.max())
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(k, dim=-1).indices, True)


def per_head_loop_smallest(scores, budgets):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            keep[r, h, scores[r, h].topk(int(budgets[r, h]), largest=False).indices] = True
    return keep


def per_head_rank_at_most(scores, budgets):
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank <= budgets[..., None]


def per_head_greedy_in_place(scores, budgets):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for step in range(int(budgets.max())):
        idx = scores.argmax(dim=-1, keepdim=True)  # (b, n_kv, 1)
        keep.scatter_(-1, idx, (budgets[..., None] > step))
        scores.scatter_(-1, idx, float("-inf"))  # marks the caller's scores
    return keep


# -- 08 CriticalAdaKV ------------------------------------------------------------------------------


def _n_safe_of(n_kept, alpha):
    return max(1, int(n_kept * alpha)) if alpha > 0 else 0


def _two_stages(scores, crit, budgets, first):
    protected = topk_mask_per_head(scores.float(), first)
    return topk_mask_per_head(crit.masked_fill(protected, torch.finfo(crit.dtype).max), budgets)


def critical_uniform_budgets(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                             first_stage_ratio=0.5):
    budgets = torch.full(scores.shape[:2], n_kept)
    protected = topk_mask_per_head(scores, (budgets * first_stage_ratio).long())
    crit = ((scores + epsilon) * projected_value_norm(values, o_proj)).masked_fill(protected, float("inf"))
    return topk_mask_per_head(crit, budgets)


def critical_no_stage_one(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                          first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    return topk_mask_per_head((scores + epsilon) * projected_value_norm(values, o_proj), budgets)


def critical_budgets_over_batch(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                                first_stage_ratio=0.5):
    b = scores.shape[0]
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(dim=(0, 2))  # kvpress: (n_kv,), all rows
    budgets = budgets[None].expand(b, -1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    return _two_stages(scores, crit, budgets, first)


def critical_no_safeguard_clamp(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                                first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    return _two_stages(scores, crit, budgets, (budgets * first_stage_ratio).long())


def critical_epsilon_outside(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                             first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = scores.float() * projected_value_norm(values, o_proj) + epsilon
    return _two_stages(scores, crit, budgets, first)


def critical_fixed_epsilon(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                           first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = (scores.float() + 1e-4) * projected_value_norm(values, o_proj)  # the default, hard-coded
    return _two_stages(scores, crit, budgets, first)


def critical_fixed_ratio(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                         first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets // 2).clamp(min=_n_safe_of(n_kept, alpha_safeguard))  # half, whatever the ratio
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    return _two_stages(scores, crit, budgets, first)


def critical_stage_two_overlaps(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                                first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    stage1 = topk_mask_per_head(scores.float(), first)
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    stage2 = topk_mask_per_head(crit, (budgets - first).clamp(min=0))  # may pick stage-1 tokens again
    return stage1 | stage2


def critical_rounded_stage_one(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                               first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = torch.round(budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    return _two_stages(scores, crit, budgets, first)


def critical_in_place(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    protected = topk_mask_per_head(scores.float(), first)
    scores += epsilon  # edits the caller's scores
    crit = scores.float() * projected_value_norm(values, o_proj)
    return topk_mask_per_head(crit.masked_fill(protected, torch.finfo(crit.dtype).max), budgets)


def critical_is_adakv(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    return topk_mask_per_head(scores.float() + epsilon, budgets)  # N forgotten: the base ranking again


def critical_fixed_alpha(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                         first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept).sum(-1)  # alpha_safeguard not passed on
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    return _two_stages(scores, crit, budgets, first)


def critical_l2_value_norm(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                           first_stage_ratio=0.5):
    b, n_kv, L, d = values.shape
    H = o_proj.shape[1] // d
    w_o = o_proj.float().T.reshape(H, d, -1)
    norm = (values.float().repeat_interleave(H // n_kv, 1) @ w_o).norm(dim=-1).reshape(b, n_kv, -1, L).mean(2)
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    return _two_stages(scores, (scores.float() + epsilon) * norm, budgets, first)


# -- 09 ragged cache -------------------------------------------------------------------------------


def append_at_front(keys, values, k_new, v_new):
    return ([[torch.cat([k_new[r, h][None], k]) for h, k in enumerate(row)] for r, row in enumerate(keys)],
            [[torch.cat([v_new[r, h][None], v]) for h, v in enumerate(row)] for r, row in enumerate(values)])


def append_in_place(keys, values, k_new, v_new):
    for r in range(len(keys)):
        for h in range(len(keys[r])):
            keys[r][h] = torch.cat([keys[r][h], k_new[r, h][None]])  # rebinds the caller's list entries
            values[r][h] = torch.cat([values[r][h], v_new[r, h][None]])
    return keys, values


def append_swapped(keys, values, k_new, v_new):
    return ([[torch.cat([k, v_new[r, h][None]]) for h, k in enumerate(row)] for r, row in enumerate(keys)],
            [[torch.cat([v, k_new[r, h][None]]) for h, v in enumerate(row)] for r, row in enumerate(values)])


def append_all_heads(keys, values, k_new, v_new):
    return ([[torch.cat([k, k_new[r]]) for k in row] for r, row in enumerate(keys)],
            [[torch.cat([v, v_new[r]]) for v in row] for r, row in enumerate(values)])


def append_first_head(keys, values, k_new, v_new):
    return ([[torch.cat([k, k_new[r, 0][None]]) for k in row] for r, row in enumerate(keys)],
            [[torch.cat([v, v_new[r, 0][None]]) for v in row] for r, row in enumerate(values)])


def attention_unscaled(query, keys, values):
    b, H, d = query.shape
    g = H // len(keys[0])
    return torch.stack([torch.stack([torch.softmax(keys[r][h // g] @ query[r, h], 0) @ values[r][h // g]
                                     for h in range(H)]) for r in range(b)])


def _attend(q, k, v, dim=-1):
    return torch.softmax((q @ k.T / math.sqrt(q.shape[-1])).float(), dim=dim).to(v.dtype) @ v


def attention_modulo_heads(query, keys, values):
    b, H, d = query.shape
    n_kv = len(keys[0])
    return torch.stack([torch.stack([_attend(query[r, h][None], keys[r][h % n_kv], values[r][h % n_kv])[0]
                                     for h in range(H)]) for r in range(b)])


def attention_padded_no_mask(query, keys, values):
    b, H, d = query.shape
    n_kv = len(keys[0])
    n = max(k.shape[0] for row in keys for k in row)
    dense_k = torch.stack([torch.stack([F.pad(k, (0, 0, 0, n - k.shape[0])) for k in row]) for row in keys])
    dense_v = torch.stack([torch.stack([F.pad(v, (0, 0, 0, n - v.shape[0])) for v in row]) for row in values])
    q = query.reshape(b, n_kv, H // n_kv, d)
    w = torch.softmax((q @ dense_k.transpose(-1, -2) / math.sqrt(d)).float(), dim=-1).to(dense_v.dtype)
    return (w @ dense_v).reshape(b, H, d)  # the zero padding is attended to


def attention_float32_result(query, keys, values):
    b, H, d = query.shape
    g = H // len(keys[0])
    out = torch.zeros(b, H, d)  # float32 whatever the cache holds
    for r in range(b):
        for h in range(H):
            out[r, h] = _attend(query[r, h][None].float(), keys[r][h // g].float(), values[r][h // g].float())[0]
    return out


def attention_softmax_over_heads(query, keys, values):
    b, H, d = query.shape
    n_kv = len(keys[0])
    g = H // n_kv
    out = torch.empty(b, H, d, dtype=values[0][0].dtype)
    for r in range(b):
        for k in range(n_kv):
            out[r, k * g:(k + 1) * g] = _attend(query[r, k * g:(k + 1) * g], keys[r][k], values[r][k], dim=0)
    return out


def attention_head_index(query, keys, values):
    b, H, d = query.shape
    return torch.stack([torch.stack([_attend(query[r, h][None], keys[r][h], values[r][h])[0]
                                     for h in range(H)]) for r in range(b)])


# -- the table -------------------------------------------------------------------------------------
# (checker, wrong implementation, a piece of the message it must get; None: no catalogued hint may appear)

WRONG = [
    (check_window_scores, window_no_causal_mask, "the causal mask is missing"),
    (check_window_scores, window_all_columns, "drop the w window columns"),
    (check_window_scores, window_mask_own_position, "may attend to its own position"),
    (check_window_scores, window_square_triu, "the window rows are the *last* w tokens"),
    (check_window_scores, window_softmax_over_rows, "not over the window rows"),
    (check_window_scores, window_repeat_not_interleave, "keys.repeat_interleave(g, dim=1)"),
    (check_window_scores, window_unscaled, "scaled by 1/sqrt(d)"),
    (check_window_scores, window_float32_result, "wrong dtype: expected torch."),
    (check_window_scores, window_renormalised, "no renormalisation"),
    (check_window_scores, window_last_columns, "the *first* columns"),
    (check_window_scores, window_scales_queries_in_place, "changed its input `queries`"),
    (check_window_scores, window_sum_over_rows, "(not the sum)"),
    (check_pooling, pool_no_padding, "pooling without padding shortens the sequence"),
    (check_pooling, pool_group_max, "*mean* over its g query heads, not the max"),
    (check_pooling, pool_exclude_padding, "divided by the number of real tokens"),
    (check_pooling, pool_padding_two, "the padding depends on the kernel"),
    (check_pooling, pool_window_max_per_head, "not per head"),
    (check_pooling, pool_window_equals_max, "strictly above every prefix token"),
    (check_pooling, pool_window_infinite, "inf breaks later arithmetic"),
    (check_pooling, pool_window_float32, "wrong dtype: expected torch."),
    (check_pooling, pool_original_repo, "the original SnapKV repository's pooling (max pooling, kernel 7)"),
    (check_pooling, pool_view_order, "form KV head k (consecutive heads)"),
    (check_pooling, pool_in_place, "changed its input `s`"),
    (check_uniform_topk, uniform_global, "one Top-K over all heads of a row"),
    (check_uniform_topk, uniform_int_mask, "wrong dtype: expected torch.bool"),
    (check_uniform_topk, uniform_indices, "a keep mask is a bool tensor"),
    (check_uniform_topk, uniform_threshold, "'score >= the k-th largest' keeps *more*"),
    (check_uniform_topk, uniform_ascending, "keeps the *largest* scores"),
    (check_uniform_topk, uniform_strictly_above_next, None),
    (check_uniform_topk, uniform_greedy_in_place, "changed its input `scores`"),
    (check_safeguard, safeguard_rounding, "int(alpha_safeguard * n_kept), not round(...)"),
    (check_safeguard, safeguard_in_place, "changed its input `scores`"),
    (check_safeguard, safeguard_infinity, "inf turns into nan"),
    (check_safeguard, safeguard_float32_max, "float32's max overflows to inf"),
    (check_safeguard, safeguard_always_one, "alpha_safeguard = 0 switches the safeguard off"),
    (check_safeguard, safeguard_no_minimum, "promised at least one token"),
    (check_safeguard, safeguard_alpha_times_length, "not of the context length L"),
    (check_safeguard, safeguard_threshold, "'score >= the n_safe-th largest'"),
    (check_safeguard, safeguard_ceil, "int(alpha_safeguard * n_kept), not math.ceil"),
    (check_safeguard, safeguard_smallest, "*highest* n_safe"),
    (check_safeguard, safeguard_setitem_in_place, "changed its input `scores`"),
    (check_adakv_selection, adakv_no_safeguard, "AdaKV without the safeguard"),
    (check_adakv_selection, adakv_per_head, "this is per-head (uniform) selection"),
    (check_adakv_selection, adakv_whole_batch, "AdaKV selects per batch row"),
    (check_adakv_selection, adakv_transposed_flatten, "flatten the heads side by side"),
    (check_adakv_selection, adakv_default_alpha, "not a fixed 0.2"),
    (check_adakv_selection, adakv_row_keeps_n_kept, "a row's budget is n_kv · n_kept pairs"),
    (check_adakv_selection, adakv_threshold, "keeps *more* than k tokens"),
    (check_adakv_selection, adakv_safeguard_in_place, "changed its input `scores`"),
    (check_adakv_selection, adakv_round_safeguard, "int(alpha_safeguard * n_kept), not round(...)"),
    (check_adakv_selection, adakv_safeguard_at_alpha_zero, "alpha_safeguard = 0 switches the safeguard off"),
    (check_floor_ceiling, bounds_without_cap, "cannot keep more than the L tokens"),
    (check_floor_ceiling, bounds_round_kept, "n_kept floors"),
    (check_floor_ceiling, bounds_minus_removed, "L - floor(L · cr) rounds the other way"),
    (check_floor_ceiling, bounds_ceiling_all, "the other n_kv - 1 heads must keep n_safe each"),
    (check_floor_ceiling, bounds_every_head_at_floor, "the head itself included"),
    (check_floor_ceiling, bounds_floor_at_alpha_zero, "alpha_safeguard = 0 switches the safeguard off"),
    (check_floor_ceiling, bounds_rounded_product, None),
    (check_floor_ceiling, bounds_no_minimum_kept, "a head keeps at least one token"),
    (check_value_norm, value_norm_l2, "not the L2 norm"),
    (check_value_norm, value_norm_group_max, "*mean* over its g query heads, not the max"),
    (check_value_norm, value_norm_of_v, "*after* the output projection"),
    (check_value_norm, value_norm_plain_reshape, "a plain reshape to (H, d, hidden) mixes heads"),
    (check_value_norm, value_norm_mean_abs, "the L1 norm is the *sum*"),
    (check_value_norm, value_norm_repeat, "values.repeat_interleave(g, dim=1)"),
    (check_value_norm, value_norm_half_precision, "compute in float32"),
    (check_value_norm, value_norm_mean_of_blocks, "average the g *norms*"),
    (check_value_norm, value_norm_keeps_dtype, "compute in float32"),
    (check_topk_per_head, per_head_single_argsort, "argsort gives, for each rank, *which token*"),
    (check_topk_per_head, per_head_threshold, "'score >= the B-th largest'"),
    (check_topk_per_head, per_head_largest_budget, "its own K = budgets[r, h]"),
    (check_topk_per_head, per_head_loop_smallest, "keep each head's *largest* scores"),
    (check_topk_per_head, per_head_rank_at_most, "keeps ranks 0 .. B - 1"),
    (check_topk_per_head, per_head_greedy_in_place, "changed its input `scores`"),
    (check_critical_adakv, critical_uniform_budgets, "these are uniform budgets"),
    (check_critical_adakv, critical_no_stage_one, "stage 1 is missing"),
    (check_critical_adakv, critical_budgets_over_batch, "budgets are per batch row"),
    (check_critical_adakv, critical_no_safeguard_clamp, "the safeguarded n_safe stay protected"),
    (check_critical_adakv, critical_epsilon_outside, "ε added *before* multiplying"),
    (check_critical_adakv, critical_fixed_epsilon, "with epsilon=0.0001"),
    (check_critical_adakv, critical_fixed_ratio, "with first_stage_ratio=0.5"),
    (check_critical_adakv, critical_stage_two_overlaps, "stage 2 fills the *rest*"),
    (check_critical_adakv, critical_rounded_stage_one, "the stage-1 size rounds *down*"),
    (check_critical_adakv, critical_in_place, "changed its input `scores`"),
    (check_critical_adakv, critical_is_adakv, "this is plain AdaKV"),
    (check_critical_adakv, critical_fixed_alpha, "adakv_keep_mask's default of 0.2 is not it"),
    (check_critical_adakv, critical_l2_value_norm, None),
    (check_ragged_append, append_at_front, "at the *end* of each head"),
    (check_ragged_append, append_in_place, "changed its input `keys[0][0]`: it was a tensor("),
    (check_ragged_append, append_swapped, "keys and values are swapped"),
    (check_ragged_append, append_all_heads, "only its own new token"),
    (check_ragged_append, append_first_head, "k_new[r, h], not k_new[r, 0]"),
    (check_ragged_attention, attention_unscaled, "scaled by 1/sqrt(d)"),
    (check_ragged_attention, attention_modulo_heads, "kv = h // g, not h % n_kv"),
    (check_ragged_attention, attention_padded_no_mask, "the padding must get -inf logits"),
    (check_ragged_attention, attention_float32_result, "wrong dtype: expected torch."),
    (check_ragged_attention, attention_softmax_over_heads, "the softmax runs over a head's *tokens*"),
    (check_ragged_attention, attention_head_index, "there are only n_kv KV heads per row"),
]


def test_many_wrong_implementations():
    assert len(WRONG) >= 57  # the 17 of the first review and at least 40 more
    assert len({w for _, w, _ in WRONG}) == len(WRONG)


@pytest.mark.parametrize("checker, wrong, hint", WRONG, ids=[w.__name__ for _, w, _ in WRONG])
def test_checker_rejects_a_learner_mistake_with_the_right_hint(checker, wrong, hint, capsys):
    with pytest.raises(ExerciseFailure) as info:
        checker(wrong)
    message = str(info.value)
    assert "✅" not in capsys.readouterr().out
    ideas = {m.idea for m in CATALOGUE[checker]}
    given = [(m.idea, m.code) for m in CATALOGUE[checker] if (m.idea, m.code) in info.value.hints]
    if hint is None:  # not in the catalogue: no catalogued hint may appear
        assert given == [], message
        assert not any(idea in message for idea in ideas), message
        return
    assert hint in message, message
    catalogued = [(m.idea, m.code) for m in CATALOGUE[checker] if hint in m.idea or hint in m.code]
    assert given == catalogued, message  # the one catalogued mistake it is, or none when it is not catalogued
    if "Hint 1 (idea)" in message:  # idea first, then code
        assert message.index("Hint 1 (idea)") < message.index("Hint 2 (code)"), message


def test_failures_say_where():
    with pytest.raises(ExerciseFailure) as info:
        check_adakv_selection(adakv_per_head)
    message = str(info.value)
    # the worked example: which head keeps how many, expected vs got
    assert "row 0, head 0 keeps 50 tokens, expected 66" in message
    assert "[[66, 43, 59, 32]]" in message and "[[50, 50, 50, 50]]" in message


REFERENCES = {
    check_window_scores: reference.window_scores, check_pooling: reference.pool_group_window,
    check_value_norm: reference.projected_value_norm, check_uniform_topk: reference.uniform_keep_mask,
    check_safeguard: reference.safeguard, check_adakv_selection: reference.adakv_keep_mask,
    check_floor_ceiling: reference.floor_ceiling, check_topk_per_head: topk_mask_per_head,
    check_critical_adakv: reference.critical_adakv_keep_mask, check_ragged_append: reference.append_token,
    check_ragged_attention: reference.ragged_attention,
}


@pytest.mark.parametrize("checker", list(CATALOGUE), ids=lambda c: c.__name__)
def test_every_catalogued_mistake_is_caught_and_hinted_as_itself(checker, capsys):
    """The catalogue itself: every mistake goes wrong on one of the checker's fixed or probe cases, and
    there the diagnosis names that mistake and no other (no two entries shadow each other)."""
    checker(REFERENCES[checker])  # right answers pass, and the run records its probe cases
    assert "✅" in capsys.readouterr().out
    run = next(r for r in LAST_RUN.values() if r["reference"] is REFERENCES[checker])
    probes, tol, expect = run["probes"], run["tol"], run["expect"]

    def caught(case, mistake):
        out = _run(mistake.fn, case)
        right = expect(case, out) if expect else _run(REFERENCES[checker], case)
        return isinstance(out, Exception) or not same(out, right, **tol)

    for mistake in CATALOGUE[checker]:
        case = next((p for p in probes + run["tied"] if caught(p, mistake)), None)
        assert case is not None, f"no fixed or probe case catches: {mistake.idea}"
        wrong = _run(mistake.fn, case)
        right = expect(case, wrong) if expect else _run(REFERENCES[checker], case)
        found = diagnose(mistake.fn, wrong, case, CATALOGUE[checker], probes, tol, REFERENCES[checker], right)
        assert found == [mistake], (mistake.idea, [m.idea for m in found], case.name)


# -- right answers written differently are accepted -------------------------------------------------
# A checker must not be stricter than the spec: other tie-breaks, float32 arithmetic for half inputs,
# loops instead of vector code.


def right_window_in_float32(queries, keys):
    w, L = queries.shape[2], keys.shape[2]
    attn = torch.softmax(_causal(_logits(queries.float(), keys.float()), w, L), dim=-1)
    return attn[..., : L - w].mean(2).to(queries.dtype)


def right_pooling_by_convolution(s, n_kv, window_size, kernel_size=5):
    b, H, n = s.shape
    ones = torch.ones(1, 1, kernel_size, dtype=s.dtype) / kernel_size
    p = F.conv1d(s.reshape(b * H, 1, n), ones, padding=kernel_size // 2).reshape(b, n_kv, H // n_kv, n).mean(2)
    return _finish(p, window_size)


def right_uniform_by_argsort(scores, n_kept):
    idx = scores.argsort(dim=-1, descending=True, stable=True)[..., :n_kept]  # ties: the first index wins
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True)


def right_uniform_last_index_wins(scores, n_kept):
    flipped = scores.flip(-1)  # ties broken the other way round
    idx = flipped.argsort(dim=-1, descending=True, stable=True)[..., :n_kept]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, idx, True).flip(-1)


def right_safeguard_loop(scores, n_kept, alpha_safeguard=0.2):
    n = _n_safe(n_kept, alpha_safeguard)
    out = scores.clone()
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            order = scores[r, h].flip(0).argsort(descending=True, stable=True)  # last index wins ties
            out[r, h, scores.shape[-1] - 1 - order[:n]] = torch.finfo(scores.dtype).max
    return out


def right_adakv_by_sorting(scores, n_kept, alpha_safeguard=0.2):
    b, n_kv, L = scores.shape
    flat = _protect(scores, n_kept, alpha_safeguard).reshape(b, -1).flip(-1)
    idx = flat.argsort(dim=-1, descending=True, stable=True)[:, : n_kv * n_kept]
    return torch.zeros_like(flat, dtype=torch.bool).scatter(-1, idx, True).flip(-1).reshape(b, n_kv, L)


def right_bounds_with_math_floor(L, compression_ratio, n_kv, alpha_safeguard=0.2):
    n_kept = max(1, math.floor(L * (1 - compression_ratio)))
    n_safe = max(1, math.floor(n_kept * alpha_safeguard)) if alpha_safeguard > 0 else 0
    return n_safe, min(L, n_kv * n_kept - (n_kv - 1) * n_safe)


def right_value_norm_einsum(values, o_proj):
    b, n_kv, L, d = values.shape
    hidden, H = o_proj.shape[0], o_proj.shape[1] // d
    w_o = o_proj.float().reshape(hidden, n_kv, H // n_kv, d)  # column block h = k * g + j
    return torch.einsum("bkld,hkjd->bkjlh", values.float(), w_o).abs().sum(-1).mean(2)


def right_per_head_loop(scores, budgets):
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            keep[r, h, scores[r, h].topk(int(budgets[r, h])).indices] = True
    return keep


def right_critical_own_ranking(scores, values, o_proj, n_kept, alpha_safeguard=0.2, epsilon=1e-4,
                               first_stage_ratio=0.5):
    budgets = adakv_keep_mask(scores, n_kept, alpha_safeguard).sum(-1)
    first = (budgets * first_stage_ratio).long().clamp(min=_n_safe_of(n_kept, alpha_safeguard))
    crit = (scores.float() + epsilon) * projected_value_norm(values, o_proj)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            protected = scores[r, h].float().topk(int(first[r, h])).indices
            rest = crit[r, h].clone()
            rest[protected] = float("inf")
            keep[r, h, rest.topk(int(budgets[r, h])).indices] = True
    return keep


def right_append_vstack(keys, values, k_new, v_new):
    return ([[torch.vstack([k, k_new[r, h]]) for h, k in enumerate(row)] for r, row in enumerate(keys)],
            [[torch.vstack([v, v_new[r, h]]) for h, v in enumerate(row)] for r, row in enumerate(values)])


def right_attention_in_float32(query, keys, values):
    b, H, d = query.shape
    g = H // len(keys[0])
    out = torch.stack([torch.stack([_attend(query[r, h][None].float(), keys[r][h // g].float(),
                                            values[r][h // g].float())[0] for h in range(H)]) for r in range(b)])
    return out.to(values[0][0].dtype)


RIGHT = [
    (check_window_scores, right_window_in_float32), (check_pooling, right_pooling_by_convolution),
    (check_uniform_topk, right_uniform_by_argsort), (check_uniform_topk, right_uniform_last_index_wins),
    (check_safeguard, right_safeguard_loop), (check_adakv_selection, right_adakv_by_sorting),
    (check_floor_ceiling, right_bounds_with_math_floor), (check_value_norm, right_value_norm_einsum),
    (check_topk_per_head, right_per_head_loop), (check_critical_adakv, right_critical_own_ranking),
    (check_ragged_append, right_append_vstack), (check_ragged_attention, right_attention_in_float32),
]


@pytest.mark.parametrize("checker, right", RIGHT, ids=[r.__name__ for _, r in RIGHT])
def test_a_right_answer_written_differently_is_accepted(checker, right, capsys):
    checker(right)
    assert "✅" in capsys.readouterr().out
