"""A KV cache that really keeps a different number of tokens in each KV head.

kvpress *simulates* AdaKV: evicted keys stay in memory and are masked at every later step, so
neither memory nor attention time goes down. Here each (batch row, KV head) owns its own
tensor of kept tokens -- a *ragged per-head cache* -- and attention runs over exactly those.

Layout of one compressed layer (reference path, plain PyTorch):

    keys[row][head]   : (n_{row,head}, d)   the kept keys of that head, oldest first
    values[row][head] : (n_{row,head}, d)

Decoding appends one token to every head. Attention of the new queries pads the heads to the
longest one and masks the padding -- obvious rather than fast. On CUDA, ``minikv.gpu`` stores the
same thing as one flat buffer with offsets and attends with a Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # transformers' extension points
    from transformers.cache_utils import CacheLayerMixin, DynamicCache
except ImportError:  # pragma: no cover - transformers is a dependency
    CacheLayerMixin, DynamicCache = object, object


class ListStore:
    """One layer's ragged KV storage: a (n, d) tensor per (batch row, KV head)."""

    def __init__(self, keys: list[list[torch.Tensor]], values: list[list[torch.Tensor]]):
        self.keys, self.values = keys, values

    @classmethod
    def from_selection(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, **_) -> "ListStore":
        """keys/values (b, n_kv, L, d), keep (b, n_kv, L) bool -> each head keeps its own tokens, in order."""
        b, n_kv = keep.shape[:2]
        k = [[keys[r, h][keep[r, h]].clone() for h in range(n_kv)] for r in range(b)]
        v = [[values[r, h][keep[r, h]].clone() for h in range(n_kv)] for r in range(b)]
        return cls(k, v)

    @property
    def lengths(self) -> torch.Tensor:
        """(b, n_kv) tokens held per head."""
        return torch.tensor([[k.shape[0] for k in row] for row in self.keys])

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values actually held."""
        return sum(t.numel() * t.element_size() for rows in (self.keys, self.values) for row in rows for t in row)

    capacity_nbytes = nbytes  # a list of exact-size tensors has no reserve: allocated == held

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values (b, n_kv, q, d): q new tokens, appended to every head."""
        for r, row in enumerate(self.keys):
            for h in range(len(row)):
                self.keys[r][h] = torch.cat([self.keys[r][h], keys[r, h]])
                self.values[r][h] = torch.cat([self.values[r][h], values[r, h]])

    def dense(self):
        """Pad heads to the longest: keys, values (b, n_kv, Lmax, d) and valid (b, n_kv, Lmax) bool."""
        lengths = self.lengths  # (b, n_kv)
        flat = lambda rows: [t for row in rows for t in row]  # b * n_kv tensors of (n, d)
        b, n_kv = lengths.shape
        keys = torch.nn.utils.rnn.pad_sequence(flat(self.keys), batch_first=True)  # (b*n_kv, Lmax, d)
        values = torch.nn.utils.rnn.pad_sequence(flat(self.values), batch_first=True)
        keys, values = keys.reshape(b, n_kv, *keys.shape[1:]), values.reshape(b, n_kv, *values.shape[1:])
        valid = torch.arange(keys.shape[2])[None, None, :] < lengths[..., None]  # (b, n_kv, Lmax)
        return keys, values, valid.to(keys.device)

    def attend(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of the q newest tokens' queries over each head's kept tokens.

        query (b, H, q, d), with query head h served by KV head h // g -> (b, H, q, d).
        New token i (of q) sees its head's older tokens and the new tokens 0..i.
        """
        b, H, q, d = query.shape
        keys, values, _ = self.dense()  # (b, n_kv, Lmax, d)
        n_kv, Lmax = keys.shape[1], keys.shape[2]
        g = H // n_kv
        lengths = self.lengths.to(query.device)  # (b, n_kv)
        # new token i sits at index lengths - q + i of its head: it may see indices <= that
        last_seen = lengths[..., None] - q + torch.arange(q, device=query.device)  # (b, n_kv, q)
        mask = torch.arange(Lmax, device=query.device) <= last_seen[..., None]  # (b, n_kv, q, Lmax)
        mask = mask[:, :, None].expand(b, n_kv, g, q, Lmax).reshape(b, n_kv, g * q, Lmax)
        qg = query.reshape(b, n_kv, g * q, d)  # (b, n_kv, g*q, d): a group's heads share one K/V
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(b, H, q, d)


def make_store(keys, values, keep):
    """The GPU store on CUDA (if minikv.gpu is usable), the reference ListStore elsewhere."""
    if keys.is_cuda:
        try:
            from .gpu import FlatStore

            return FlatStore.from_selection(keys, values, keep)
        except ImportError:
            pass
    return ListStore.from_selection(keys, values, keep)


class RaggedLayer(CacheLayerMixin):
    """A transformers cache layer holding a ragged store. Built by compression, then grows by decoding."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, store, seq_length: int):
        super().__init__()
        self.store = store
        self.seq_length = seq_length  # logical length: original context + appended tokens (RoPE positions)
        self.is_initialized = True
        self.armed = False  # set by minikv's pre-hook: the next update comes with ragged attention
        self.device = None

    def lazy_initialization(self, key_states, value_states):  # already initialised at construction
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.armed:
            raise RuntimeError(
                "this cache layer is ragged (each KV head keeps its own tokens); standard attention would "
                "silently read the wrong keys. Call minikv.attach(model) (load_model/generate/press(model) do it)."
            )
        self.armed = False
        self.store.append(key_states, value_states)
        self.seq_length += key_states.shape[-2]
        return key_states, value_states  # attention reads the store itself (see minikv.hf.ragged_attention)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length, *args, **kwargs):
        q = query_length if isinstance(query_length, int) else query_length.shape[-1]
        return self.seq_length + q, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):  # pragma: no cover
        raise NotImplementedError("RaggedLayer does not support offloading")

    prefetch = offload

    def reorder_cache(self, beam_idx):  # pragma: no cover
        raise NotImplementedError("RaggedLayer does not support beam search")

    def reset(self):  # pragma: no cover
        raise NotImplementedError("a ragged layer cannot be reset; make a new RaggedCache")


class RaggedCache(DynamicCache):
    """A DynamicCache whose layers become ragged when a press compresses them.

    ``cache.kept_counts()`` -> (layers, b, n_kv); ``cache.selections[i]`` the Selection of layer i;
    ``cache.nbytes()`` the bytes of keys and values actually held; ``cache.allocated_nbytes()`` the
    bytes allocated for them (more than held on CUDA, where the FlatStore keeps free room per head
    so that decoding appends in place).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selections: dict[int, object] = {}

    def compress_layer(self, layer_idx: int, selection) -> None:
        """Replace layer ``layer_idx`` (dense, just prefilled) by the tokens ``selection.keep`` marks."""
        dense = self.layers[layer_idx]
        keys, values = dense.keys, dense.values  # (b, n_kv, L, d)
        store = make_store(keys, values, selection.keep)
        self.layers[layer_idx] = RaggedLayer(store, keys.shape[-2])
        self.selections[layer_idx] = selection

    def is_ragged(self, layer_idx: int) -> bool:
        return layer_idx < len(self.layers) and isinstance(self.layers[layer_idx], RaggedLayer)

    def layer_nbytes(self, layer_idx: int, allocated: bool = False) -> int:
        """Bytes of keys and values held by one layer (``allocated=True``: allocated, free reserve included)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, RaggedLayer):
            return layer.store.capacity_nbytes if allocated else layer.store.nbytes
        if getattr(layer, "keys", None) is None:
            return 0
        return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()

    def nbytes(self) -> int:
        """Bytes of keys and values held by all layers."""
        return sum(self.layer_nbytes(i) for i in range(len(self.layers)))

    def allocated_nbytes(self) -> int:
        """Bytes allocated for keys and values by all layers: ``nbytes()`` plus any free reserve (FlatStore on CUDA)."""
        return sum(self.layer_nbytes(i, allocated=True) for i in range(len(self.layers)))

    def full_nbytes(self) -> int:
        """Bytes the same layers would take uncompressed (every head holding every token)."""
        total = 0
        for i, layer in enumerate(self.layers):
            if isinstance(layer, RaggedLayer):
                lengths = layer.store.lengths
                per_pair = layer.store.nbytes / max(1, int(lengths.sum()))  # bytes per (head, token): 2 * d * itemsize
                total += int(round(per_pair * lengths.numel() * layer.seq_length))
            else:
                total += self.layer_nbytes(i)
        return total

    def kept_counts(self) -> torch.Tensor:
        """(layers, b, n_kv) tokens held per head right now (compressed context + appended tokens)."""
        counts = []
        for layer in self.layers:
            if isinstance(layer, RaggedLayer):
                counts.append(layer.store.lengths.cpu())
            else:
                b, n_kv, L = layer.keys.shape[:3]
                counts.append(torch.full((b, n_kv), L))
        return torch.stack(counts)
