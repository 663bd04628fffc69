"""What a scorer sees, and what it must return.

A *scorer* answers one question: how important is each cached token, in each KV head?
It returns a tensor of shape (b, n_kv, L) -- higher means "keep me". It never decides
*how many* tokens a head keeps; that is the job of a policy (``minikv.policies``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerInputs:
    """Everything one attention layer offers a scorer at the end of prefill.

    keys:    (b, n_kv, L, d)  keys after RoPE, as the cache stores them
    values:  (b, n_kv, L, d)
    queries: (b, H, w, d)     queries of the last w context tokens, after RoPE (SnapKV's window);
                              None when the scorer needs none
    o_proj:  (hidden, H * d)  weight of the layer's output projection W_o (CriticalKV); or None
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None
    o_proj: torch.Tensor | None = None

    def __post_init__(self):
        if self.keys.dim() != 4:
            raise ValueError(f"keys must have shape (b, n_kv, L, d), got {tuple(self.keys.shape)}")
        if self.values.shape[:3] != self.keys.shape[:3]:
            raise ValueError(
                f"values must match keys in (b, n_kv, L): keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
            )
        if self.queries is not None:
            b, H, _, d = self.queries.shape
            if b != self.keys.shape[0] or d != self.keys.shape[3]:
                raise ValueError(
                    f"queries (b, H, w, d) must match keys (b, n_kv, L, d) in b and d: "
                    f"queries {tuple(self.queries.shape)}, keys {tuple(self.keys.shape)}"
                )
            if H % self.n_kv != 0:
                raise ValueError(
                    f"the number of query heads ({H}) must be a multiple of the number of KV heads "
                    f"({self.n_kv}) to form GQA groups"
                )
        if self.o_proj is not None and self.o_proj.shape[1] % self.keys.shape[3] != 0:
            raise ValueError(f"o_proj must have shape (hidden, H * d) with d = {self.keys.shape[3]}, got {tuple(self.o_proj.shape)}")

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv(self) -> int:
        return self.keys.shape[1]

    @property
    def context_length(self) -> int:
        return self.keys.shape[2]


class Scorer:
    """Base class: ``score(inputs) -> (b, n_kv, L)`` importance, higher = keep."""

    #: how many trailing queries the scorer needs (SnapKV: its window); 0 = none
    needs_queries: int = 0

    def score(self, inputs: LayerInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, context_length: int) -> None:
        """Raise a clear error if this scorer cannot score a context of this length."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
