"""A whole decode step of a Llama-style model on FlatStore caches, replayed as one CUDA graph.

Why not ``model(input_ids, cache=...)``: transformers' forward keeps Python-side state at every
step (cache positions, the mask, the cache's lengths on the host), and a CUDA graph replays only
device work. So ``StaticDecoder`` runs the same arithmetic from the model's own weights, with every
changing number on the device:

    x = embed[ids]                                   # (b, hidden)   ids: (b,) static buffer
    for each layer:
        h, x = add_rmsnorm(x, mlp_prev)              # input_layernorm (x += previous MLP output)
        qkv  = h @ W_qkv^T                           # (b, (H + 2 n_kv) d): q, k, v as one matmul
        q    = rope_append(qkv, pos, store)          # RoPE; k, v written at each segment's end; lengths += 1
        a    = attention(q, store)                   # (b, H d): Triton kernel, grid sized by capacity
        h, x = add_rmsnorm(x, a @ W_o^T)             # post_attention_layernorm
        mlp_prev = silu_mul(h @ W_gu^T) @ W_down^T   # (b, hidden)
    h, _   = add_rmsnorm(x, mlp_prev)                # final norm
    logits = h @ W_lm^T ; ids = argmax(logits) ; pos += 1

Static means: the buffers (ids, pos, each store's keys/values/starts/lengths) keep their
addresses from step to step; appends write at ``starts + lengths`` read on the device; the
attention kernel's grid is planned from each store's *capacity*, not its current length. Hence
one capture serves every step until a store's reserve runs out; then the stores are re-laid out
(new addresses) and the step is captured again. The host only counts steps.

Supported: Llama-style decoder layers (llama, mistral without sliding window, qwen2) -- RMSNorm,
rotate-half RoPE with a static frequency table, SiLU-gated MLP. Anything else is refused with an error.

Three attention back ends (``attention=``): ``"triton"`` (the ragged kernel), ``"sdpa"`` (PyTorch
SDPA over a *uniform* store seen as a dense (b, n_kv, capacity, d) tensor with a length mask: the
preallocated full-cache baseline), ``"torch"`` (the same for any store, gathering each segment's
capacity: slow, for CPUs and head dims the kernel does not take). ``"auto"``: triton where it runs.
The small ops (norm, RoPE + append, SiLU * up) are fused Triton kernels on CUDA (``ops="triton"``),
plain PyTorch elsewhere (``ops="torch"``; defined below, the tests compare the two). ``ops="fused"``
goes further for small models (``minikv.gpu.triton_fused``): the norm is folded into the q/k/v matmul,
which also applies RoPE and appends k, v; and into the gate/up matmul, which also applies SiLU * up --
5 launches per layer instead of 9 (attention included):

    q, x  = norm_qkv_rope(x, mlp_prev, ...)          # k, v written at each segment's end (not counted yet)
    a     = attention(q, store, pending=1)           # counts the written token
    act, x = norm_gate_up(x, a @ W_o^T, ..., bump=lengths)   # lengths += 1
    mlp_prev = act @ W_down^T

Measured on the H200 (results/gpu/NOTES.md, runs 3-4) it is *slower* than ``ops="triton"`` (23.4-23.7 against
20.1 us per SmolLM2 layer): a Triton matmul of 64 rows that normalises them first waits on memory per K block, where
cuBLAS streams its tiles. So ``ops="auto"`` means "triton" on CUDA and "torch" elsewhere; "fused" stays an option.

``pdl`` (programmatic dependent launch, Hopper or newer; ``minikv.gpu.triton_linear``): every kernel of a layer may
start while the one in front of it still runs, prefetch what does not depend on it (the weights, the first keys),
then wait for it. cuBLAS kernels take no part, so PDL comes with the step's matmuls in Triton (``linear="triton"``).
``pdl=None`` turns both on for layers whose matrices fit L2 easily (SmolLM2: 1.71 -> 1.56 ms per step, results/gpu/
NOTES.md runs 6-9) and leaves them off for large ones (the Llama-3.1-8B shape: 2-3 % slower with them).

``streams=n`` splits the batch into n row groups, each decoded on its own CUDA stream inside the graph (measured:
+1.8 % for SmolLM2 before the attention plan took one wave per layer, a loss after it); ``overlap=True`` interleaves
the groups layer by layer by hand (measured slower). Both are options; the default is one stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .store import FlatStore, _triton_usable

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


# --------------------------------------------------------------------------------------------
# the small ops, in plain PyTorch (the definitions the fused Triton kernels follow)
# --------------------------------------------------------------------------------------------
def torch_add_rmsnorm(x, res, weight, eps):
    """(rmsnorm(x + res) * weight, x + res), rounded as transformers' LlamaRMSNorm rounds."""
    s = x if res is None else x + res
    xf = s.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    return weight * y, s


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def torch_rope_append(qkv, pos, cos_table, sin_table, k_flat, v_flat, starts, lengths, H, n_kv, d):
    """qkv (b, (H + 2 n_kv) d) -> rotated queries (b, H, d); rotated keys and values appended in place."""
    b = qkv.shape[0]
    q = qkv[:, :H * d].reshape(b, H, d)
    k = qkv[:, H * d:(H + n_kv) * d].reshape(b, n_kv, d)
    v = qkv[:, (H + n_kv) * d:].reshape(b, n_kv, d)
    cos = cos_table.index_select(0, pos)[:, None]  # (b, 1, d)
    sin = sin_table.index_select(0, pos)[:, None]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    slots = starts + lengths  # (S,) first free row of each segment, on the device
    k_flat.index_copy_(0, slots, k.reshape(-1, d).to(k_flat.dtype))
    v_flat.index_copy_(0, slots, v.reshape(-1, d).to(v_flat.dtype))
    lengths += 1
    return q


def torch_silu_mul(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


# --------------------------------------------------------------------------------------------
# the model's weights, arranged for the step
# --------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    ln1: torch.Tensor
    eps1: float
    w_qkv: torch.Tensor  # (H d + 2 n_kv d, hidden): q_proj, k_proj, v_proj stacked
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln2: torch.Tensor
    eps2: float
    w_gu: torch.Tensor  # (2 I, hidden): gate_proj, up_proj stacked
    b_gu: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    H: int
    n_kv: int
    d: int
    scaling: float


def _cat(*ts):
    if all(t is None for t in ts):
        return None
    return torch.cat([t.detach() for t in ts], dim=0)


def check_llama_style(model) -> None:
    """Raise a ValueError naming what is unsupported, unless the model is a Llama-style decoder."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"StaticDecoder supports model_type in {SUPPORTED_MODEL_TYPES} (Llama-style layers), "
                         f"got {kind!r}; use the model's own forward with a RaggedCache instead")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"StaticDecoder needs hidden_act='silu' (a SiLU-gated MLP), got {cfg.hidden_act!r}")
    sliding = getattr(cfg, "sliding_window", None)
    if kind == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        sliding = None
    if sliding is not None:
        raise ValueError(f"StaticDecoder does not implement sliding-window attention (config.sliding_window={sliding})")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if "dynamic" in str(rope_type) or "longrope" in str(rope_type):
        raise ValueError(f"StaticDecoder needs a static RoPE frequency table; rope_type {rope_type!r} changes with length")
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        raise ValueError("StaticDecoder does not implement per-head q/k norms (Qwen3-style); use the model's forward")


class StepWeights:
    """The model's weights as the step reads them (q/k/v and gate/up stacked: one matmul each).

    The stacked matrices are copies (for Llama-3.1-8B, ~9 GB more); the rest are the model's own tensors.
    """

    def __init__(self, model):
        check_llama_style(model)
        base = model.model
        self.dtype = base.embed_tokens.weight.dtype
        self.device = base.embed_tokens.weight.device
        bad = sorted({str(p.dtype) for p in model.parameters()} - {str(self.dtype)})
        if bad:
            raise ValueError(f"StaticDecoder needs every weight in one dtype ({self.dtype}); also found {bad}")
        self.embed = base.embed_tokens.weight.detach()
        self.layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            H = a.q_proj.out_features // a.head_dim
            n_kv = a.k_proj.out_features // a.head_dim
            self.layers.append(LayerWeights(
                ln1=layer.input_layernorm.weight.detach(), eps1=float(layer.input_layernorm.variance_epsilon),
                w_qkv=_cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                b_qkv=_cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) if a.q_proj.bias is not None else None,
                w_o=a.o_proj.weight.detach(), b_o=None if a.o_proj.bias is None else a.o_proj.bias.detach(),
                ln2=layer.post_attention_layernorm.weight.detach(),
                eps2=float(layer.post_attention_layernorm.variance_epsilon),
                w_gu=_cat(m.gate_proj.weight, m.up_proj.weight),
                b_gu=_cat(m.gate_proj.bias, m.up_proj.bias) if m.gate_proj.bias is not None else None,
                w_down=m.down_proj.weight.detach(), b_down=None if m.down_proj.bias is None else m.down_proj.bias.detach(),
                H=H, n_kv=n_kv, d=a.head_dim, scaling=float(a.scaling)))
        self.norm_w, self.norm_eps = base.norm.weight.detach(), float(base.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight.detach()
        self.tied = self.lm_head.data_ptr() == self.embed.data_ptr()
        self.rotary = base.rotary_emb
        self.vocab = self.lm_head.shape[0]

    def bytes_read(self, b: int) -> int:
        """Bytes of weights one step reads: every matrix and norm once, and b rows of the embedding."""
        total = sum(t.numel() * t.element_size() for lw in self.layers
                    for t in (lw.ln1, lw.w_qkv, lw.b_qkv, lw.w_o, lw.b_o, lw.ln2, lw.w_gu, lw.b_gu, lw.w_down, lw.b_down)
                    if t is not None)
        total += self.norm_w.numel() * self.norm_w.element_size() + self.lm_head.numel() * self.lm_head.element_size()
        return total + b * self.embed.shape[1] * self.embed.element_size()

    @torch.no_grad()
    def rope_tables(self, n_positions: int):
        """cos, sin (n_positions, d) in the model's dtype: the model's own rotary embedding at positions 0..n-1."""
        x = torch.empty(1, dtype=self.dtype, device=self.device)
        pos = torch.arange(n_positions, device=self.device)[None]  # (1, P)
        cos, sin = self.rotary(x, pos)  # (1, P, d)
        return cos[0].contiguous(), sin[0].contiguous()


# --------------------------------------------------------------------------------------------
# the decoder
# --------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    """One layer's store as a group of batch rows sees it (views: the same memory as the store's)."""

    k_flat: torch.Tensor
    v_flat: torch.Tensor
    starts: torch.Tensor  # (S_g,) the group's segments
    lengths: torch.Tensor  # (S_g,) a view of the store's lengths: moving these moves the store's
    plan: tuple  # (slots in all, longest capacity) of the group: the attention kernel's grid
    slots: torch.Tensor  # (C,) 0 .. longest capacity - 1 (the masks of the PyTorch paths)
    rows: torch.Tensor | None  # (S_g, C) buffer rows, attention="torch"
    dense: tuple | None  # (keys, values) (b_g, n_kv, C, d) views, attention="sdpa"


class StaticDecoder:
    """Greedy decoding of a Llama-style model over one FlatStore per layer; one CUDA graph replay per token.

    weights: ``StepWeights(model)``; stores: one FlatStore per layer (the decoder appends to them in
    place and keeps their host counters up to date); position: the RoPE position of the first new
    token (the original context length); first_ids (b,): the first new token of each row.
    ``step()`` -> logits (b, vocab) of that token, and ``ids`` holds the greedy next token.
    """

    def __init__(self, weights: StepWeights, stores: list, position: int, first_ids: torch.Tensor,
                 attention: str = "auto", ops: str = "auto", graph: bool | None = None, max_new_tokens: int = 1024,
                 streams: int = 1, overlap: bool = False, attn_programs_per_sm: int | None = None,
                 linear: str = "auto", pdl: bool | None = None):
        if attention not in ("auto", "triton", "sdpa", "torch"):
            raise ValueError(f"attention must be 'auto', 'triton', 'sdpa' or 'torch', got {attention!r}")
        if ops not in ("auto", "triton", "fused", "torch"):
            raise ValueError(f"ops must be 'auto', 'triton', 'fused' or 'torch', got {ops!r}")
        if len(stores) != len(weights.layers):
            raise ValueError(f"need one store per layer: {len(weights.layers)} layers, got {len(stores)} stores")
        for i, (s, lw) in enumerate(zip(stores, weights.layers)):
            if not isinstance(s, FlatStore):
                raise TypeError(f"stores[{i}] must be a minikv.gpu.FlatStore, got {type(s).__name__}")
            if (s.n_kv, s.k_flat.shape[1]) != (lw.n_kv, lw.d) or s.k_flat.device != weights.device:
                raise ValueError(f"stores[{i}] holds {s.n_kv} KV heads of dim {s.k_flat.shape[1]} on {s.k_flat.device}; "
                                 f"layer {i} has {lw.n_kv} of dim {lw.d} on {weights.device}")
            if lw.d % 2:
                raise ValueError(f"rotate-half RoPE needs an even head dim, got {lw.d}")
        self.w, self.stores = weights, list(stores)
        self.b = stores[0].b
        if first_ids.shape != (self.b,):
            raise ValueError(f"first_ids must have shape (b,) = ({self.b},), got {tuple(first_ids.shape)}")
        dev = weights.device
        if attention == "auto":
            attention = "triton" if all(_triton_usable(s.k_flat) for s in stores) else "torch"
        if attention == "triton" and not all(_triton_usable(s.k_flat) for s in stores):
            raise ValueError("attention='triton' needs CUDA stores, Triton, and a head dim/dtype the kernel takes")
        if attention == "sdpa" and not all(s.is_uniform() for s in stores):
            raise ValueError("attention='sdpa' reads each store as a dense tensor: every store must be uniform "
                             "(FlatStore.uniform / empty_uniform)")
        if ops == "auto":
            ops = "triton" if dev.type == "cuda" and _triton_importable() else "torch"
        if ops in ("triton", "fused") and not _triton_importable():
            raise ValueError(f"ops={ops!r} needs Triton; use ops='torch'")
        if ops in ("triton", "fused") and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"ops={ops!r} runs Triton kernels: it needs CUDA weights and stores (or TRITON_INTERPRET=1); "
                             "use ops='torch' on the CPU")
        self.attention, self.ops = attention, ops
        if pdl is not None and not isinstance(pdl, bool):
            raise ValueError(f"pdl must be None (auto), True or False, got {pdl!r}")
        if pdl is None:
            pdl = _pdl_pays(weights, ops)
        if pdl:
            from .layout import check_pdl  # (no Triton needed to say why not)

            check_pdl(dev)
            if ops != "triton":
                raise ValueError(f"pdl=True launches the Triton step kernels with programmatic dependent launch: it needs "
                                 f"ops='triton' (or 'auto' on CUDA), got ops={ops!r}")
        if linear not in ("auto", "torch", "triton"):
            raise ValueError(f"linear must be 'auto', 'torch' (F.linear: cuBLAS on CUDA) or 'triton' "
                             f"(minikv.gpu.triton_linear), got {linear!r}")
        if linear == "auto":
            linear = "triton" if pdl else "torch"
        if linear == "triton" and ops not in ("triton", "fused"):
            raise ValueError(f"linear='triton' runs a Triton kernel: it needs ops='triton' (Triton available, CUDA or "
                             f"TRITON_INTERPRET=1), got ops={ops!r}")
        self.linear, self.pdl = linear, pdl
        self.use_graph = (dev.type == "cuda") if graph is None else graph
        if self.use_graph and dev.type != "cuda":
            raise ValueError("CUDA graphs need CUDA tensors; pass graph=False on the CPU")
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= self.b:
            raise ValueError(f"streams must be an int from 1 to the batch size {self.b}, got {streams!r}")
        self.n_streams = streams
        bounds = [int(t[0]) for t in torch.arange(self.b).tensor_split(streams)] + [self.b]
        self.row_groups = list(zip(bounds[:-1], bounds[1:]))  # rows each stream decodes, e.g. [(0, 32), (32, 64)]
        self.cuda_streams = [torch.cuda.Stream(device=dev) for _ in self.row_groups] if dev.type == "cuda" and streams > 1 else []
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if overlap and streams < 2:
            raise ValueError("overlap=True interleaves row groups: it needs streams >= 2")
        self.overlap = bool(overlap)
        if self.overlap and dev.type == "cuda":  # the small ops before the attention, on a high-priority stream
            lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
            self.ops_stream = torch.cuda.Stream(device=dev, priority=hi)
            self.attn_stream = torch.cuda.Stream(device=dev, priority=lo)
        if attn_programs_per_sm is not None and (isinstance(attn_programs_per_sm, bool) or not isinstance(attn_programs_per_sm, int)
                                                 or attn_programs_per_sm < 1):
            raise ValueError(f"attn_programs_per_sm must be None or a positive int, got {attn_programs_per_sm!r}")
        self.attn_programs = None
        if attn_programs_per_sm is not None and dev.type == "cuda":
            self.attn_programs = attn_programs_per_sm * torch.cuda.get_device_properties(dev).multi_processor_count
        self.ids = first_ids.to(dev, torch.long).clone()  # (b,) static input: the token each row feeds next
        self.position0 = position
        self.pos = torch.full((self.b,), position, dtype=torch.long, device=dev)  # (b,) RoPE position, static
        self.steps = 0  # tokens decoded (host count)
        self.captures = 0  # how many times the step was captured (1 + one per re-layout)
        self.graph, self.logits = None, None
        self._tables(max_new_tokens)
        self._prepare()

    # -- state --------------------------------------------------------------------------------------
    def _tables(self, n_new: int):
        self.table_len = self.position0 + max(n_new, 1)
        self.cos, self.sin = self.w.rope_tables(self.table_len)
        self.graph = None

    def _prepare(self):
        """Plans that depend on the stores' buffers: redone after every re-layout (and the graph with them).

        One ``_Rows`` per (row group, layer): views of the store's starts and lengths for those rows (the
        same memory: appends through a view move the store's lengths) and the attention kernel's grid,
        sized by the group's capacity -- fixed until the room runs out.
        """
        self.parts = []
        for r0, r1 in self.row_groups:
            layers = []
            for s in self.stores:
                s0, s1 = r0 * s.n_kv, r1 * s.n_kv
                cap = s.capacity[s0:s1]
                n_cap, max_cap = int(cap.sum()), int(cap.max())  # host sync: once per re-layout, not per step
                slots = torch.arange(max_cap, device=s.k_flat.device)  # (C,)
                rows = None
                if self.attention == "torch":  # buffer rows of each segment's capacity, clamped inside the buffer
                    rows = (s.starts[s0:s1, None] + slots).clamp_(max=s.k_flat.shape[0] - 1)  # (S_g, C)
                dense = None
                if self.attention == "sdpa":
                    kd, vd = s.dense_view()
                    dense = kd[r0:r1], vd[r0:r1]
                layers.append(_Rows(s.k_flat, s.v_flat, s.starts[s0:s1], s._lengths[s0:s1],
                                    (n_cap, max_cap), slots, rows, dense))
            self.parts.append((r0, r1, layers))
        self.graph = None

    def snapshot(self):
        """Everything a step changes (lengths, positions, next ids, host counters); see ``restore``."""
        return [s.snapshot() for s in self.stores], self.pos.clone(), self.ids.clone(), self.steps

    def restore(self, snap) -> None:
        stores, pos, ids, steps = snap
        for s, st in zip(self.stores, stores):
            s.restore(st)
        self.pos.copy_(pos)
        self.ids.copy_(ids)
        self.steps = steps

    def set_ids(self, ids: torch.Tensor) -> None:
        """Feed these tokens (b,) at the next step instead of the greedy ones (teacher forcing)."""
        self.ids.copy_(ids)

    # -- one step -------------------------------------------------------------------------------------
    def _norm(self, x, res, weight, eps):
        if self.ops in ("triton", "fused"):
            from .triton_step import add_rmsnorm

            return add_rmsnorm(x, res, weight, eps, pdl=self.pdl)
        return torch_add_rmsnorm(x, res, weight, eps)

    def _linear(self, x, weight, bias):
        if self.linear == "triton":
            from .triton_linear import linear

            return linear(x, weight, bias, pdl=self.pdl)
        return F.linear(x, weight, bias)

    def _rope_append(self, qkv, pos, store, lw):
        args = (qkv, pos, self.cos, self.sin, store.k_flat, store.v_flat, store.starts, store.lengths,
                lw.H, lw.n_kv, lw.d)
        if self.ops == "triton":
            from .triton_step import rope_append

            return rope_append(*args, pdl=self.pdl)
        return torch_rope_append(*args)

    def _silu_mul(self, gu):
        if self.ops == "triton":
            from .triton_step import silu_mul

            return silu_mul(gu, pdl=self.pdl)
        return torch_silu_mul(gu)

    def _attend(self, q, store, lw, pending: int = 0):
        """q (b, H, d) over the store's rows (a ``_Rows``; the new token already appended) -> (b, H d).

        pending=1: the new token is written but ``lengths`` does not count it yet (``ops="fused"``).
        """
        b, H, d = q.shape
        if self.attention == "triton":
            from .triton_decode import flat_decode_attention

            n_cap, max_cap = store.plan
            out = flat_decode_attention(q.view(b, H, 1, d), store.k_flat, store.v_flat, store.starts, store.lengths,
                                        lw.scaling, n_cap, max_cap, pending=pending, programs=self.attn_programs,
                                        pdl=self.pdl)
            return out.view(b, H * d)
        slots = store.slots
        if self.attention == "sdpa":
            keys, values = store.dense  # (b, n_kv, C, d)
        else:
            keys = store.k_flat[store.rows].view(b, lw.n_kv, -1, d)  # (b, n_kv, C, d), C = longest capacity
            values = store.v_flat[store.rows].view(b, lw.n_kv, -1, d)
        valid = (slots[None, :keys.shape[2]] < (store.lengths + pending)[:, None]).view(b, lw.n_kv, 1, -1)  # (b, n_kv, 1, C)
        qg = q.view(b, lw.n_kv, H // lw.n_kv, d)  # a group's g heads as g query rows of one KV head
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=valid, scale=lw.scaling)
        return out.reshape(b, H * d)

    def _step(self):
        """One token for every row, device work only (this is what the graph captures).

        With several row groups each group's whole step runs on its own CUDA stream: the groups share
        nothing but the (read-only) weights, so one group's memory-bound attention may overlap another's
        launch-bound small matmuls. Streams fork from and join back to the current one (a graph
        captures that as parallel branches). ``overlap=True`` arranges that overlap explicitly instead
        (``_step_overlap``).
        """
        if len(self.parts) == 1:
            return self._step_rows(*self.parts[0])
        if not self.cuda_streams:  # CPU: the groups one after the other (same arithmetic)
            return torch.cat([self._step_rows(*part) for part in self.parts])
        if self.overlap:
            return self._step_overlap()
        main = torch.cuda.current_stream()
        outs = []
        for part, stream in zip(self.parts, self.cuda_streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(self._step_rows(*part))
        for stream in self.cuda_streams:
            main.wait_stream(stream)
        return torch.cat(outs)

    # a layer in three pieces: before the attention, the attention, after it
    def _pre(self, x, mlp_prev, lw, store, pos):
        """(residual, previous MLP output) -> (rotated queries (rows, H, d), residual); k, v appended."""
        if self.ops == "fused":  # see minikv.gpu.triton_fused: the lengths move on in _post
            from .triton_fused import norm_qkv_rope

            return norm_qkv_rope(x, mlp_prev, lw.ln1, lw.eps1, lw.w_qkv, lw.b_qkv, pos, self.cos, self.sin,
                                 store.k_flat, store.v_flat, store.starts, store.lengths, lw.H, lw.n_kv, lw.d)
        h, x = self._norm(x, mlp_prev, lw.ln1, lw.eps1)  # x: the residual stream
        qkv = self._linear(h, lw.w_qkv, lw.b_qkv)  # (rows, (H + 2 n_kv) d)
        return self._rope_append(qkv, pos, store, lw), x

    def _post(self, x, a, lw, store):
        """(residual, attention output (rows, H d)) -> (residual, MLP output)."""
        if self.ops == "fused":
            from .triton_fused import norm_gate_up

            act, x = norm_gate_up(x, self._linear(a, lw.w_o, lw.b_o), lw.ln2, lw.eps2, lw.w_gu, lw.b_gu, bump=store.lengths)
            return x, self._linear(act, lw.w_down, lw.b_down)
        h, x = self._norm(x, self._linear(a, lw.w_o, lw.b_o), lw.ln2, lw.eps2)
        return x, self._linear(self._silu_mul(self._linear(h, lw.w_gu, lw.b_gu)), lw.w_down, lw.b_down)

    def _head(self, x, mlp_prev, ids, pos):
        """Final norm, LM head, greedy token into ``ids``, positions + 1 -> logits (rows, vocab)."""
        h, _ = self._norm(x, mlp_prev, self.w.norm_w, self.w.norm_eps)
        logits = F.linear(h, self.w.lm_head)  # cuBLAS: the Triton LM head (with SiLU folded into down) cost +0.5 ms, run 7b
        torch.argmax(logits, dim=-1, out=ids)  # the greedy next token, into the static input
        pos.add_(1)
        return logits

    def _step_rows(self, r0: int, r1: int, stores: list):
        """One token for rows r0 .. r1 - 1 (``stores``: their ``_Rows`` views, one per layer) -> logits."""
        ids, pos = self.ids[r0:r1], self.pos[r0:r1]
        x = F.embedding(ids, self.w.embed)  # (rows, hidden)
        mlp_prev = None
        pending = 1 if self.ops == "fused" else 0
        for lw, store in zip(self.w.layers, stores):
            q, x = self._pre(x, mlp_prev, lw, store, pos)
            a = self._attend(q, store, lw, pending)  # (rows, H d)
            x, mlp_prev = self._post(x, a, lw, store)
        return self._head(x, mlp_prev, ids, pos)

    def _step_overlap(self):
        """The groups interleaved layer by layer: small ops on one (high-priority) stream, attention on another.

        Ops stream:        [g0: post(i-1), pre(i)] [g1: post(i-1), pre(i)] [g0: post(i), pre(i+1)] ...
        Attention stream:              [g0: attn(i)]            [g1: attn(i)]            [g0: attn(i+1)] ...
        Each piece waits (an event) for the one it needs, so while one group's attention streams its cache
        the other group's matmuls run. Every tensor that crosses streams stays referenced until the step
        ends (all streams joined), so the allocator cannot hand its memory to another op while it is in use.
        """
        main, ops, att = torch.cuda.current_stream(), self.ops_stream, self.attn_stream
        ops.wait_stream(main)
        att.wait_stream(main)
        pending = 1 if self.ops == "fused" else 0
        keep, st = [], []
        with torch.cuda.stream(ops):
            for r0, r1, _ in self.parts:
                st.append(dict(x=F.embedding(self.ids[r0:r1], self.w.embed), mlp=None, a=None, done=None))
        for i, lw in enumerate(self.w.layers):
            for g, (r0, r1, stores) in enumerate(self.parts):
                s, store = st[g], stores[i]
                with torch.cuda.stream(ops):
                    if s["a"] is not None:  # the previous layer's attention of this group
                        ops.wait_event(s["done"])
                        s["x"], s["mlp"] = self._post(s["x"], s["a"], self.w.layers[i - 1], stores[i - 1])
                    q, s["x"] = self._pre(s["x"], s["mlp"], lw, store, self.pos[r0:r1])
                    ready = torch.cuda.Event()
                    ready.record(ops)
                with torch.cuda.stream(att):
                    att.wait_event(ready)
                    s["a"] = self._attend(q, store, lw, pending)
                    s["done"] = torch.cuda.Event()
                    s["done"].record(att)
                keep += [q, s["a"]]
        outs = []
        with torch.cuda.stream(ops):
            for g, (r0, r1, stores) in enumerate(self.parts):
                s = st[g]
                ops.wait_event(s["done"])
                s["x"], s["mlp"] = self._post(s["x"], s["a"], self.w.layers[-1], stores[-1])
                outs.append(self._head(s["x"], s["mlp"], self.ids[r0:r1], self.pos[r0:r1]))
            logits = torch.cat(outs)
        main.wait_stream(ops)
        main.wait_stream(att)
        del keep
        return logits

    def _make_room(self):
        """Before a step: grow the stores if a reserve is used up, the RoPE table if it is too short."""
        if self.position0 + self.steps + 1 > self.table_len:
            self._tables(2 * (self.table_len - self.position0))
        if min(s.room for s in self.stores) < 1:
            for s in self.stores:
                s.grow(max(s.reserve, 16))  # new buffers: the captured graph would write into the old ones
            self._prepare()

    def _advance(self):
        self.steps += 1
        for s in self.stores:
            s.advance(1)

    def step_eager(self) -> torch.Tensor:
        """One step without the graph (same ops): logits (b, vocab)."""
        self._make_room()
        with torch.no_grad():
            logits = self._step()
        self._advance()
        return logits

    def capture(self) -> None:
        """Warm up once on a side stream (compiles kernels, sets up cuBLAS), undo it, capture one step."""
        self._make_room()
        snap = self.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.restore(snap)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self.logits = self._step()  # recorded, not run: no state changes here
        self.graph = graph
        self.captures += 1

    def step(self) -> torch.Tensor:
        """One token: a graph replay on CUDA (captured on first use and after a re-layout), else eager."""
        if not self.use_graph:
            return self.step_eager()
        self._make_room()
        if self.graph is None:
            self.capture()
        self.graph.replay()
        self._advance()
        return self.logits

    def kv_bytes(self) -> int:
        """Bytes of keys and values held now (all layers)."""
        return sum(s.nbytes for s in self.stores)


def _pdl_pays(weights: StepWeights, ops: str) -> bool:
    """pdl=None: PDL and the Triton matmuls where they were measured faster -- Hopper or newer, ops='triton', and
    layers whose matrices are small (each <= triton_linear.SMALL_WEIGHT_BYTES, L2-sized: the step is latency-bound).

    Measured on the H200 (results/gpu/NOTES.md, runs 6-9): SmolLM2 (0.7-3.5 MB per matrix) 1.70-1.71 -> 1.56 ms per
    step (SnapKV, ratio 0.75, runs 8-9); the Llama-3.1-8B shape (33-235 MB per matrix) 6.97 -> 7.14 ms (run 8; 11.1 ms
    with run 6's one-size tiles).
    """
    if ops != "triton" or weights.device.type != "cuda" or not _triton_importable():
        return False
    from .layout import pdl_supported
    from .triton_linear import SMALL_WEIGHT_BYTES

    biggest = max(t.numel() * t.element_size() for lw in weights.layers for t in (lw.w_qkv, lw.w_o, lw.w_gu, lw.w_down))
    return pdl_supported(weights.device.index or 0) and biggest <= SMALL_WEIGHT_BYTES


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# prefill into uniform stores (and the queries a press needs)
# --------------------------------------------------------------------------------------------
@dataclass
class Prefilled:
    stores: list  # one uniform FlatStore per layer: every context token, room for `reserve` more
    queries: list | None  # per layer (b, H, n_queries, d) post-RoPE queries of the last tokens, or None
    logits: torch.Tensor  # (b, vocab) at the last context position
    context_length: int

    def layer_inputs(self, i: int, o_proj: torch.Tensor | None = None, n_queries: int | None = None):
        """What a press sees for layer i (as minikv.hf's compression hook builds it)."""
        from ..scorers.base import LayerInputs

        keys, values = self.stores[i].dense_view()
        L = self.context_length
        q = None
        if self.queries is not None and n_queries:
            q = self.queries[i][:, :, -n_queries:]
        return LayerInputs(keys[:, :, :L], values[:, :, :L], q, o_proj)


@torch.no_grad()
def prefill_to_stores(model, input_ids: torch.Tensor, reserve: int = 64, n_queries: int = 0,
                      rows_per_chunk: int | None = None) -> Prefilled:
    """Run the context (b, L) through the model, keeping every layer's keys and values in uniform FlatStores.

    The stores are the full cache (``StaticDecoder(attention="sdpa" | "triton")`` decodes on them);
    a press selects from them (``Prefilled.layer_inputs``), exactly what it would select during
    ``minikv.hf.prefill``: compression there happens after each layer's attention, so it changes no
    later layer's keys. Rows go through ``rows_per_chunk`` at a time (memory), each into a fresh
    DynamicCache whose tensors are copied into the stores.
    """
    from transformers.cache_utils import DynamicCache

    from ..hf import attention_modules, cache_kwarg, window_queries

    b, L = input_ids.shape
    mods = attention_modules(model)
    w = model.model.embed_tokens.weight
    dtype, device = w.dtype, w.device
    stores, queries = [], [] if n_queries else None
    for m in mods:
        H = m.q_proj.out_features // m.head_dim
        n_kv = m.k_proj.out_features // m.head_dim
        stores.append(FlatStore.empty_uniform(b, n_kv, L, m.head_dim, reserve, dtype, device))
        if n_queries:
            queries.append(torch.empty(b, H, n_queries, m.head_dim, dtype=dtype, device=device))
    logits = None
    chunk = rows_per_chunk or b
    kw = cache_kwarg(model.model)
    for r0 in range(0, b, chunk):
        r1 = min(b, r0 + chunk)

        def grab(module, args, kwargs, output, r0=r0, r1=r1):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            queries[mods.index(module)][r0:r1] = window_queries(module, hidden, kwargs["position_embeddings"], n_queries)

        handles = [m.register_forward_hook(grab, with_kwargs=True) for m in mods] if n_queries else []
        cache = DynamicCache()
        try:
            out = model.model(input_ids=input_ids[r0:r1].to(device), use_cache=True, **{kw: cache})
        finally:
            for h in handles:
                h.remove()
        for i, s in enumerate(stores):
            kd, vd = s.dense_view()
            kd[r0:r1, :, :L] = cache.layers[i].keys
            vd[r0:r1, :, :L] = cache.layers[i].values
        last = model.lm_head(out.last_hidden_state[:, -1])  # (rows, vocab)
        if logits is None:
            logits = last.new_empty(b, last.shape[-1])
        logits[r0:r1] = last
        del cache, out
    return Prefilled(stores, queries, logits, L)


def select_rows_per_chunk(prefilled: Prefilled, press, model, max_bytes: float = 2 ** 31) -> int:
    """Batch rows a press selects from at once so that its largest float32 temporary stays under ``max_bytes``.

    CriticalKV's ``||v W_o||_1`` is a (rows, n_kv, L, hidden) float32 product: for Llama-3.1-8B at b = 8, L = 32k,
    32 GiB if built at once (issue-13 run 1 ran out of memory). ``minikv.policies.critical`` now computes it a few
    tokens at a time (``MAX_TEMP_ELEMENTS``); selecting a few rows at a time also bounds the other (rows, n_kv, L)
    temporaries. Every press here selects each batch row on its own (scores, AdaKV budgets and top-k are per row),
    so selecting a few rows at a time gives the same masks.
    """
    s0 = prefilled.stores[0]
    hidden = model.config.hidden_size
    per_row = s0.n_kv * prefilled.context_length * max(hidden, s0.k_flat.shape[1]) * 4
    return max(1, min(s0.b, int(max_bytes // per_row)))


def compressed_stores(prefilled: Prefilled, press, model, reserve: int = 64, rows_per_select: int | None = None) -> list:
    """One FlatStore per layer holding what ``press`` keeps of the prefilled context.

    The press selects ``rows_per_select`` batch rows at a time (default: ``select_rows_per_chunk``, memory);
    the keep masks are the same as one call on the whole batch (presses select each row on its own).
    """
    from ..hf import attention_modules
    from ..scorers.base import LayerInputs

    rows = rows_per_select or select_rows_per_chunk(prefilled, press, model)
    stores = []
    for i, m in enumerate(attention_modules(model)):
        inputs = prefilled.layer_inputs(i, m.o_proj.weight.detach(), press.needs_queries)
        b = inputs.keys.shape[0]
        if rows >= b:
            keep = press.select(inputs).keep
        else:
            keep = torch.cat([press.select(LayerInputs(
                inputs.keys[r0:r0 + rows], inputs.values[r0:r0 + rows],
                None if inputs.queries is None else inputs.queries[r0:r0 + rows], inputs.o_proj)).keep
                for r0 in range(0, b, rows)])
        stores.append(FlatStore.from_selection(inputs.keys, inputs.values, keep, reserve=reserve))
    return stores
