"""Test helpers shared by tests/test_hf.py and tests/test_families.py: references computed without minikv's attention."""

import torch

from minikv.hf import cache_kwarg


def masked_reference_logits(model, ctx_ids, q_ids, selections):
    """Dense cache, evicted (head, token) pairs masked to -inf in the question's attention (eager, float32).

    The question's logits as if every layer kept its whole context but each KV head could only see
    the tokens ``selections[layer].keep`` marks -- what minikv's ragged attention must equal.
    """
    from transformers import AttentionInterface
    from transformers.cache_utils import DynamicCache

    def masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, H, q, d = query.shape
        n_kv, Lk = key.shape[1], key.shape[2]
        g = H // n_kv
        L = Lk - q
        keep = torch.ones(b, n_kv, Lk, dtype=torch.bool)
        keep[..., :L] = selections[module.layer_idx].keep
        allowed = keep[:, :, None, :].expand(b, n_kv, q, Lk).clone()
        allowed[..., L:] &= torch.ones(q, q, dtype=torch.bool).tril()  # causal among the question tokens
        allowed = allowed.repeat_interleave(g, dim=1)  # (b, H, q, Lk)
        k = key.repeat_interleave(g, dim=1)
        v = value.repeat_interleave(g, dim=1)
        logits = (query @ k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(logits, dim=-1) @ v
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("minikv_masked_ref", masked)
    cache = DynamicCache()
    kw = cache_kwarg(model)
    model(input_ids=ctx_ids, use_cache=True, **{kw: cache})  # full prefill with the model's current attention
    old = model.config._attn_implementation
    model.set_attn_implementation("minikv_masked_ref")
    try:
        return model(input_ids=q_ids, use_cache=True, **{kw: cache}).logits
    finally:
        model.set_attn_implementation(old)


def spy_queries(model, input_ids):
    """{layer: (queries (b, H, L, d) as the model hands them to its attention function, scaling)}, via transformers' SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = {}

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        seen[module.layer_idx] = (query.clone(), scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("minikv_query_spy", spy)
    old = model.config._attn_implementation
    model.set_attn_implementation("minikv_query_spy")
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        model.set_attn_implementation(old)
    return seen
