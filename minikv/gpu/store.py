"""FlatStore: one layer's ragged KV cache as two flat buffers with per-segment offsets.

Same interface as the reference stores in ``minikv.cache`` (``ListStore``): build it from a
Selection's keep mask, append decode tokens, attend, report its bytes. The layout is drawn
in ``minikv.gpu.layout``; decode attention (q == 1) runs the Triton kernel of
``minikv.gpu.triton_decode``; several new tokens at once (q > 1) use a padded PyTorch path.

Host-side bookkeeping: every segment grows by the same q tokens at every append, so the
total size, the longest segment and the free room left are known on the host without
asking the GPU -- a decode step never waits for a device -> host copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layout


def _triton_usable(t: torch.Tensor) -> bool:
    """A CUDA tensor, a head dim and dtype the kernel handles, and Triton importable."""
    if not t.is_cuda or not layout.kernel_supports(t.shape[-1], t.dtype):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class FlatStore:
    """One layer; segment s = row * n_kv + head holds its tokens at k_flat[starts[s] : starts[s] + lengths[s]]."""

    def __init__(self, k_flat, v_flat, starts, lengths, capacity, b: int, n_kv: int, n_total: int, max_len: int,
                 room: int, reserve: int):
        self.k_flat, self.v_flat = k_flat, v_flat  # (total capacity, d)
        self.starts, self._lengths, self.capacity = starts, lengths, capacity  # (S,) long each
        self.b, self.n_kv = b, n_kv
        self.n_total, self.max_len = n_total, max_len  # host ints: tokens held, longest segment
        self.room = room  # free slots left in every segment (the same for all: they grow together)
        self.reserve = reserve
        self.use_triton = None  # None: the kernel where it can run; False: always the PyTorch path

    @classmethod
    def from_selection(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, reserve: int = 256) -> "FlatStore":
        """keys/values (b, n_kv, L, d), keep (b, n_kv, L) bool -> each head keeps its own tokens, in order.

        One host sync (the total size); no loop over heads.
        """
        b, n_kv = keep.shape[:2]
        k, v, starts, lengths, capacity, n_total, max_len = layout.build_flat(keys, values, keep, reserve)
        return cls(k, v, starts, lengths, capacity, b, n_kv, n_total, max_len, reserve, reserve)

    @classmethod
    def uniform(cls, keys: torch.Tensor, values: torch.Tensor, reserve: int = 256) -> "FlatStore":
        """Every head keeps every token (a full cache) in the flat layout: no selection, no gather.

        keys/values (b, n_kv, L, d). All segments have the same capacity L + reserve, so the
        buffer *is* a dense (b, n_kv, L + reserve, d) tensor: ``dense_view()`` returns it.
        """
        b, n_kv, L, d = keys.shape
        store = cls.empty_uniform(b, n_kv, L, d, reserve, keys.dtype, keys.device)
        kd, vd = store.dense_view()
        kd[:, :, :L] = keys
        vd[:, :, :L] = values
        return store

    @classmethod
    def empty_uniform(cls, b: int, n_kv: int, L: int, d: int, reserve: int, dtype, device) -> "FlatStore":
        """A full cache of L tokens per head (contents to be written through ``dense_view()[..., :L, :]``)."""
        S, cap = b * n_kv, L + reserve
        k = torch.zeros(S * cap, d, dtype=dtype, device=device)  # zeros: free slots are read (masked) by SDPA
        v = torch.zeros_like(k)
        starts = torch.arange(S, device=device) * cap  # (S,)
        lengths = torch.full((S,), L, dtype=torch.long, device=device)
        capacity = torch.full((S,), cap, dtype=torch.long, device=device)
        return cls(k, v, starts, lengths, capacity, b, n_kv, S * L, L, reserve, reserve)

    def is_uniform(self) -> bool:
        """True when every segment has the same capacity, laid out in order (a dense tensor in disguise)."""
        cap = self.k_flat.shape[0] // (self.b * self.n_kv)
        return bool(cap * self.b * self.n_kv == self.k_flat.shape[0]
                    and torch.equal(self.starts, torch.arange(self.b * self.n_kv, device=self.starts.device) * cap))

    def dense_view(self):
        """keys, values as (b, n_kv, capacity, d) views of the buffers -- for a uniform store only."""
        S = self.b * self.n_kv
        cap = self.k_flat.shape[0] // S
        if cap * S != self.k_flat.shape[0]:
            raise ValueError("dense_view() needs a uniform store (FlatStore.uniform / empty_uniform); this one is ragged")
        d = self.k_flat.shape[1]
        return self.k_flat.view(self.b, self.n_kv, cap, d), self.v_flat.view(self.b, self.n_kv, cap, d)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """(b, n_kv) tokens held per head."""
        return self._lengths.reshape(self.b, self.n_kv)

    def _meta_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.starts, self._lengths, self.capacity))

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values actually held (not the free reserve), plus the offsets."""
        row = self.k_flat.shape[1] * self.k_flat.element_size()
        return 2 * self.n_total * row + self._meta_nbytes()

    @property
    def capacity_nbytes(self) -> int:
        """Bytes allocated, free reserve included."""
        return self.k_flat.numel() * self.k_flat.element_size() * 2 + self._meta_nbytes()

    # -- decode --------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values (b, n_kv, q, d): q new tokens for every head, written in place."""
        b, n_kv, q, d = keys.shape
        if q > self.room:  # reserve used up: copy every segment into a new layout with fresh room
            self.grow(max(self.reserve, q))
        slots = layout.append_slots(self.starts, self._lengths, q).reshape(-1)  # (S * q,)
        # index_copy_ rather than k_flat[slots] = ...: same result, a fraction of the launch overhead
        self.k_flat.index_copy_(0, slots, keys.reshape(-1, d).to(self.k_flat.dtype))
        self.v_flat.index_copy_(0, slots, values.reshape(-1, d).to(self.v_flat.dtype))
        self._lengths += q  # in place: a captured CUDA graph keeps reading this very tensor
        self.advance(q)

    def advance(self, q: int) -> None:
        """Host-side bookkeeping of q tokens appended to every segment (the device lengths move elsewhere)."""
        self.n_total += q * self.b * self.n_kv
        self.max_len += q
        self.room -= q

    def grow(self, reserve: int | None = None) -> None:
        """Copy every segment into fresh buffers with ``reserve`` free slots each (new buffer addresses)."""
        reserve = self.reserve if reserve is None else reserve
        self.k_flat, self.v_flat, self.starts, self.capacity = layout.relayout(
            self.k_flat, self.v_flat, self.starts, self._lengths, self.n_total, reserve)
        self.room = reserve

    def capacity_bounds(self) -> tuple[int, int]:
        """(slots in all, longest segment's capacity): upper bounds of n_total and max_len until the room runs out."""
        return self.n_total + self.room * self.b * self.n_kv, self.max_len + self.room

    def snapshot(self):
        """The state a decode step changes (lengths and the host counters); ``restore`` puts it back.

        The key/value slots written after a snapshot are not restored: they lie past the restored
        lengths, free again, and the next appends overwrite them.
        """
        return self._lengths.clone(), self.n_total, self.max_len, self.room, self.k_flat

    def restore(self, snap) -> None:
        lengths, self.n_total, self.max_len, self.room, k_flat = snap
        if k_flat is not self.k_flat:
            raise RuntimeError("FlatStore.restore: the store was re-laid out since the snapshot")
        self._lengths.copy_(lengths)  # in place, as append

    def attend(self, query: torch.Tensor, scaling: float, use_triton: bool | None = None) -> torch.Tensor:
        """Attention of the q newest tokens' queries over each head's tokens.

        query (b, H, q, d), query head h served by KV head h // g -> (b, H, q, d).
        New token i (of q) sees its head's older tokens and the new tokens 0..i.
        """
        b, H, q, d = query.shape
        if use_triton is None:
            use_triton = self.use_triton
        if use_triton is None:
            use_triton = q == 1 and _triton_usable(self.k_flat)
        if use_triton:
            from .triton_decode import flat_decode_attention

            return flat_decode_attention(query, self.k_flat, self.v_flat, self.starts, self._lengths, scaling,
                                         self.n_total, self.max_len)
        return self._attend_padded(query, scaling)

    def _attend_padded(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Simple path: pad heads to the longest, mask padding and future new tokens, SDPA."""
        b, H, q, d = query.shape
        keys, values, _ = self.dense()  # (b, n_kv, Lmax, d)
        n_kv, Lmax = self.n_kv, self.max_len
        g = H // n_kv
        last_seen = self.lengths[..., None] - q + torch.arange(q, device=query.device)  # (b, n_kv, q)
        mask = torch.arange(Lmax, device=query.device) <= last_seen[..., None]  # (b, n_kv, q, Lmax)
        mask = mask[:, :, None].expand(b, n_kv, g, q, Lmax).reshape(b, n_kv, g * q, Lmax)
        qg = query.reshape(b, n_kv, g * q, d)  # a group's g heads share one K/V
        out = F.scaled_dot_product_attention(qg, keys.to(query.dtype), values.to(query.dtype), attn_mask=mask, scale=scaling)
        return out.reshape(b, H, q, d)

    def dense(self):
        """Pad heads to the longest: keys, values (b, n_kv, Lmax, d) and valid (b, n_kv, Lmax) bool."""
        return layout.to_dense(self.k_flat, self.v_flat, self.starts, self._lengths, self.max_len, self.b, self.n_kv)

    def __repr__(self) -> str:
        return (f"FlatStore(b={self.b}, n_kv={self.n_kv}, tokens={self.n_total}, longest={self.max_len}, "
                f"room={self.room}, nbytes={self.nbytes}, capacity_nbytes={self.capacity_nbytes})")
