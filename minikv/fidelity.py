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


# --------------------------------------------------------------------------------------------
# held-out vs in-sample attention-output error of a kept set
# --------------------------------------------------------------------------------------------
def output_and_mass(queries, keys, values, o_proj, q_start: int, keep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's attention output after o_proj, split by KV head, with and without eviction.

    queries (b, H, m, d) at positions q_start.., keys/values (b, n_kv, T, d), keep (b, n_kv, T) bool.
    -> y_full, y_kept: (b, n_kv, m, hidden) -- sum over a KV head's g query heads of o_h W_o^h --
    and the attention mass each query head puts on evicted tokens under the full cache, (b, H, m).
    """
    b, H, m, d = queries.shape
    n_kv = keys.shape[1]
    g = H // n_kv
    a_full = causal_attention(queries, keys, q_start)  # (b, H, m, T)
    a_kept = causal_attention(queries, keys, q_start, keep)  # (b, H, m, T)
    evicted = (~keep).repeat_interleave(g, dim=1)[:, :, None, :]  # (b, H, 1, T)
    mass = (a_full * evicted).sum(-1)  # (b, H, m)
    y = [head_outputs(a, values, o_proj).reshape(b, n_kv, g, m, -1).sum(2) for a in (a_full, a_kept)]  # (b, n_kv, m, hidden)
    return y[0], y[1], mass


def relative_errors(y_full, y_kept) -> tuple[torch.Tensor, torch.Tensor]:
    """-> per KV head (b, n_kv) and per layer (b,): ||y_kept - y_full||_2 / ||y_full||_2, averaged over queries."""
    diff = y_kept - y_full  # (b, n_kv, m, hidden)
    head = (diff.norm(dim=-1) / y_full.norm(dim=-1).clamp_min(1e-12)).mean(-1)  # (b, n_kv)
    layer = (diff.sum(1).norm(dim=-1) / y_full.sum(1).norm(dim=-1).clamp_min(1e-12)).mean(-1)  # (b,)
    return head, layer


def layer_fidelity(li, context_length: int, window: int, keep) -> dict:
    """How much one layer's output changes when only ``keep`` of the context is cached.

    li: LayerInputs over T = context_length + C tokens (context, then its true continuation), whose
        queries are those of the last window + C tokens (capture_layers(model, ids, n_queries=window + C)).
    keep: (b, n_kv, context_length) bool, the press's selection.
    -> {"future"/"window": {"head_err" (b, n_kv), "layer_err" (b,), "head_mass" (b, n_kv), "layer_mass" (b,)}}

    "future": the C continuation queries (held out: the press never saw them), over the kept
    context plus the continuation so far (never evicted). "window": the last ``window`` context
    queries, those SnapKV chose the tokens with (in-sample).
    """
    L = context_length
    b, n_kv, T, _ = li.keys.shape
    H = li.queries.shape[1]
    g = H // n_kv
    keep_all = keep_through(keep.to(li.keys.device), T)  # (b, n_kv, T): the continuation is never evicted
    out = {}
    for name, q, start, t_end in (("future", li.queries[:, :, window:], L, T), ("window", li.queries[:, :, :window], L - window, L)):
        y_full, y_kept, mass = output_and_mass(q, li.keys[:, :, :t_end], li.values[:, :, :t_end], li.o_proj, start,
                                               keep_all[..., :t_end])
        head_err, layer_err = relative_errors(y_full, y_kept)
        head_mass = mass.reshape(b, n_kv, g, -1).mean((2, 3))  # (b, n_kv)
        out[name] = dict(head_err=head_err, layer_err=layer_err, head_mass=head_mass, layer_mass=head_mass.mean(1))
    return out


def budget_shift(counts: torch.Tensor) -> torch.Tensor:
    """Share of a layer's budget that a policy moved between heads, relative to the uniform split.

    counts (..., n_kv) tokens kept per head -> (...,) = sum_h |B_h - mean B| / (2 * sum_h B_h).
    0 for a uniform split; 0.25 when, of 4 heads with 50 each, two give 25 to the other two.

    >>> budget_shift(torch.tensor([[70, 40, 60, 30], [50, 50, 50, 50]]))
    tensor([0.1500, 0.0000])
    """
    c = counts.float()
    return (c - c.mean(-1, keepdim=True)).abs().sum(-1) / (2 * c.sum(-1)).clamp_min(1)


# --------------------------------------------------------------------------------------------
# continuation fidelity: which tokens need the distant context (LongPPL's criterion)
# --------------------------------------------------------------------------------------------
def long_dependent_tokens(logp_full: torch.Tensor, logp_short: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Tokens whose prediction depends on distant context (Fang et al., 2024, LongPPL, arXiv 2410.23771).

    logp_full / logp_short (b, C): log-prob of each true continuation token given the full context /
    only the last few context tokens. A token is long-dependent when the full context raises its
    log-prob by more than ``threshold`` nats (LongPPL's LSD; 2 in the paper). -> (b, C) bool.
    """
    return (logp_full - logp_short) > threshold


# --- lesson helpers ---------------------------------------------------------------------------
# Lessons 03 and 04 prefill a context *and what follows it* once (capture_layers), then judge a
# press twice: on the window queries it chose its tokens with (in-sample) and on the queries of
# the later tokens, which it never saw (held out).
def split_capture(layer, n_context: int, window: int):
    """Cut one capture of "context + continuation" into what a press sees and what it never sees.

    layer: LayerInputs over T tokens, from ``capture_layers(model, ids, n_queries=window + T - n_context)``.
    -> (view, future):
       view    LayerInputs with the keys/values of the first n_context tokens, the queries of their
               last ``window`` tokens and W_o: exactly what a press sees at the end of the context
               (causal attention: later tokens change nothing before them);
       future  (b, H, T - n_context, d): the queries of the tokens after the context, positions n_context ..

    >>> from minikv.scorers.base import LayerInputs
    >>> li = LayerInputs(torch.zeros(1, 1, 10, 4), torch.zeros(1, 1, 10, 4), torch.zeros(1, 2, 7, 4))
    >>> view, future = split_capture(li, n_context=6, window=3)
    >>> view.keys.shape[2], view.queries.shape[2], future.shape[2]
    (6, 3, 4)
    """
    from .scorers.base import LayerInputs

    T = layer.context_length
    if layer.queries is None:
        raise ValueError("split_capture needs the layer's queries: capture with n_queries=window + T - n_context")
    if isinstance(n_context, bool) or not isinstance(n_context, int) or not 1 <= n_context < T:
        raise ValueError(f"n_context must be an int in [1, {T - 1}] (the capture holds T = {T} tokens), got {n_context!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= n_context:
        raise ValueError(f"window must be an int in [1, n_context = {n_context}], got {window!r}")
    m = layer.queries.shape[2]
    if m != window + T - n_context:
        raise ValueError(f"the capture holds the queries of the last {m} tokens; split_capture needs window + T - n_context "
                         f"= {window} + {T} - {n_context} = {window + T - n_context} (capture_layers(..., n_queries=...))")
    view = LayerInputs(layer.keys[:, :, :n_context], layer.values[:, :, :n_context], layer.queries[:, :, :window], layer.o_proj)
    return view, layer.queries[:, :, window:]


def keep_through(keep: torch.Tensor, length: int) -> torch.Tensor:
    """A context's keep mask (b, n_kv, L), extended to (b, n_kv, length): what follows the context is kept.

    The continuation (question, answer, later text) is appended to the cache uncompressed.

    >>> keep_through(torch.tensor([[[True, False]]]), 4)
    tensor([[[ True, False,  True,  True]]])
    """
    b, n_kv, L = keep.shape
    if isinstance(length, bool) or not isinstance(length, int) or length < L:
        raise ValueError(f"length must be an int >= the mask's {L} context tokens, got {length!r}")
    return torch.cat([keep, torch.ones(b, n_kv, length - L, dtype=torch.bool, device=keep.device)], dim=-1)


def head_outputs(attn: torch.Tensor, values: torch.Tensor, o_proj: torch.Tensor) -> torch.Tensor:
    """o_h = sum_i a_i u_i, each query head's contribution to the layer output (after W_o): (b, H, m, hidden).

    attn (b, H, m, T) from :func:`causal_attention`, values (b, n_kv, T, d), o_proj (hidden, H * d).
    Equal to ``attn @ projected_values(values, o_proj)`` (W_o is linear), but mixes the values first,
    in d dimensions, and applies W_o^h once per query instead of once per token: several times cheaper.
    Summed over h it is the layer's attention output (o_proj has no bias in Llama-style models).
    """
    b, H, m, T = attn.shape
    n_kv, d = values.shape[1], values.shape[3]
    if values.shape[2] != T or H % n_kv or o_proj.shape[1] != H * d:
        raise ValueError(f"attn (b, H, m, T) = {tuple(attn.shape)}, values (b, n_kv, T, d) = {tuple(values.shape)} and "
                         f"o_proj (hidden, H * d) = {tuple(o_proj.shape)} do not fit together")
    mixed = attn @ values.float().repeat_interleave(H // n_kv, dim=1)  # (b, H, m, d)
    return torch.einsum("bhmd,hdo->bhmo", mixed, o_proj.float().T.reshape(H, d, -1))  # (b, H, m, hidden)
