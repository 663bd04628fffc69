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

    Checked when built, so that no scorer or policy runs on inputs that would give a wrong answer
    without an error: floating-point tensors, on one device, keys / values / queries of one dtype
    (o_proj may differ: CriticalKV reads it in float32), b, n_kv, L, d >= 1, every shape agreeing
    (H a multiple of n_kv; o_proj's H * d columns matching the queries' heads and the values' head
    dim), and every value finite -- one NaN or inf in a key would turn every head's SnapKV scores
    into NaN and the selection into noise.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor | None = None
    o_proj: torch.Tensor | None = None

    def __post_init__(self):
        _check_tensor("keys", self.keys, "(b, n_kv, L, d)")
        if 0 in self.keys.shape:
            raise ValueError(f"keys (b, n_kv, L, d) must have b, n_kv, L, d >= 1 (a batch of 0 rows or an empty "
                             f"context has nothing to score), got {tuple(self.keys.shape)}")
        _check_tensor("values", self.values, "(b, n_kv, L, d)", like=self.keys)
        if self.values.shape != self.keys.shape:
            raise ValueError(
                f"values must match keys in (b, n_kv, L, d): keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
            )
        b, n_kv, _, d = self.keys.shape
        if self.queries is not None:
            _check_tensor("queries", self.queries, "(b, H, w, d)", like=self.keys)
            _, H, w, dq = self.queries.shape
            if self.queries.shape[0] != b or dq != d:
                raise ValueError(
                    f"queries (b, H, w, d) must match keys (b, n_kv, L, d) in b and d: "
                    f"queries {tuple(self.queries.shape)}, keys {tuple(self.keys.shape)}"
                )
            if w < 1 or H < 1:
                raise ValueError(f"queries (b, H, w, d) must have H, w >= 1, got {tuple(self.queries.shape)}")
            if H % n_kv != 0:
                raise ValueError(
                    f"the number of query heads ({H}) must be a multiple of the number of KV heads "
                    f"({n_kv}) to form GQA groups"
                )
        if self.o_proj is not None:
            _check_tensor("o_proj", self.o_proj, "(hidden, H * d)", like=self.keys, same_dtype=False)
            cols = self.o_proj.shape[1]
            if self.queries is not None and cols != self.queries.shape[1] * d:
                raise ValueError(
                    f"o_proj must have shape (hidden, H * d) = (hidden, {self.queries.shape[1]} * {d}) for "
                    f"{self.queries.shape[1]} query heads of head dim {d}, got {tuple(self.o_proj.shape)}"
                )
            if cols == 0 or cols % (n_kv * d) != 0:
                raise ValueError(
                    f"o_proj must have shape (hidden, H * d) with H a multiple of n_kv = {n_kv} and d = {d} "
                    f"(the values' head dim), got {tuple(self.o_proj.shape)}"
                )
        named = [("keys", self.keys), ("values", self.values), ("queries", self.queries), ("o_proj", self.o_proj)]
        named = [(n, t) for n, t in named if t is not None]
        # one device sync for all tensors: the per-tensor flags are only looked at when one fails
        flags = torch.stack([torch.isfinite(t).all() for _, t in named])
        if not bool(flags.all()):
            bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
            raise ValueError(f"{', '.join(bad)} contain NaN or inf; scores computed from them would be meaningless "
                             "(check the model's dtype for overflow, e.g. float16)")

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def n_kv(self) -> int:
        return self.keys.shape[1]

    @property
    def context_length(self) -> int:
        return self.keys.shape[2]


class DegenerateBudgetWarning(UserWarning):
    """The budget is too small for the scorer's ranking to decide (e.g. n_kept < SnapKV's window)."""


def _check_tensor(name: str, t, shape: str, like: torch.Tensor | None = None, same_dtype: bool = True) -> None:
    """A floating-point tensor with as many axes as ``shape`` names, on ``like``'s device (and of its dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    n_axes = shape.count(",") + 1
    if t.dim() != n_axes:
        raise ValueError(f"{name} must have shape {shape} ({n_axes} axes), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but keys are on {like.device}; put every tensor on one device")
    if like is not None and same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but keys have {like.dtype}; give keys, values and queries one dtype")


class Scorer:
    """Base class: ``score(inputs) -> (b, n_kv, L)`` importance, higher = keep."""

    #: how many trailing queries the scorer needs (SnapKV: its window); 0 = none
    needs_queries: int = 0

    def score(self, inputs: LayerInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, context_length: int) -> None:
        """Raise a clear error if this scorer cannot score a context of this length."""

    def check_budget(self, n_kept: int, context_length: int) -> None:
        """Warn if a budget of ``n_kept`` tokens per head makes this scorer's ranking degenerate (default: never)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
