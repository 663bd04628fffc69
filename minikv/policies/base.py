"""Policies: given a scorer's scores, decide which tokens each KV head keeps.

A *press* in minikv is a policy wrapped around a scorer -- ``Uniform(SnapKV())`` is kvpress's
``snapkv``, ``AdaKV(SnapKV())`` its ``adakv_snapkv``. Every policy returns a :class:`Selection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import check_ratio, n_kept
from ..scorers.base import LayerInputs, Scorer


@dataclass
class Selection:
    """Which tokens each (batch row, KV head) keeps.

    keep:   (b, n_kv, L) bool  -- True = kept
    scores: (b, n_kv, L) the scores the policy ranked by (None for no_press)
    n_kept: the per-head (average) budget; every row keeps n_kv * n_kept pairs in total
    """

    keep: torch.Tensor
    scores: torch.Tensor | None
    n_kept: int
    n_safe: int = 0

    @property
    def counts(self) -> torch.Tensor:
        """(b, n_kv) tokens kept per head."""
        return self.keep.sum(dim=-1)

    def indices(self, row: int, head: int) -> torch.Tensor:
        """Sorted positions kept by one (batch row, KV head)."""
        return self.keep[row, head].nonzero().flatten()

    def __repr__(self) -> str:
        return f"Selection(counts={self.counts.tolist()}, n_kept={self.n_kept}, n_safe={self.n_safe})"


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last axis.

    >>> topk_mask(torch.tensor([[1., 5., 2., 9.]]), 2)
    tensor([[False,  True, False,  True]])
    """
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def topk_mask_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Keep the top ``budgets[r, h]`` tokens of each (row, head): a Top-K whose K differs per head.

    scores (b, n_kv, L), budgets (b, n_kv) -> (b, n_kv, L) bool.
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (b, n_kv, L)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < budgets[..., None]


class Press:
    """Base policy. Subclasses implement :meth:`keep_mask`.

    ``press.select(inputs)`` works on plain tensors; ``with press(model):`` compresses a
    Hugging Face model's KV cache during prefill (see ``minikv.hf``).
    """

    def __init__(self, scorer: Scorer | None, compression_ratio: float = 0.0):
        if scorer is not None and not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a minikv Scorer (e.g. SnapKV()), got {type(scorer).__name__}")
        self.scorer = scorer
        self.compression_ratio = check_ratio(compression_ratio)

    # -- the policy -------------------------------------------------------------------------
    def keep_mask(self, scores: torch.Tensor, inputs: LayerInputs, n_kept: int) -> tuple[torch.Tensor, int]:
        """Return (keep mask (b, n_kv, L), n_safe)."""
        raise NotImplementedError

    def select(self, inputs: LayerInputs) -> Selection:
        """Score the layer, then decide what each head keeps."""
        L = inputs.context_length
        if self.scorer is None or self.compression_ratio == 0:
            keep = torch.ones(inputs.keys.shape[:3], dtype=torch.bool, device=inputs.keys.device)
            return Selection(keep, None, L)
        self.check(L)
        k = n_kept(L, self.compression_ratio)
        scores = self.scorer.score(inputs)  # (b, n_kv, L)
        keep, safe = self.keep_mask(scores, inputs, k)
        return Selection(keep, scores, k, safe)

    def check(self, context_length: int) -> None:
        if self.scorer is not None:
            self.scorer.check(context_length)

    @property
    def needs_queries(self) -> int:
        return 0 if self.scorer is None else self.scorer.needs_queries

    # -- use on a model ---------------------------------------------------------------------
    def __call__(self, model):
        """``with press(model): model(...)`` compresses every layer's cache during prefill."""
        from ..hf import apply_press

        return apply_press(self, model)

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self._extra_repr()
        return f"{type(self).__name__}({self.scorer!r}, compression_ratio={self.compression_ratio}{extra})"


class NoPress(Press):
    """Keeps everything (kvpress's ``no_press``)."""

    def __init__(self, compression_ratio: float = 0.0):
        super().__init__(None, 0.0)
        check_ratio(compression_ratio)

    def __repr__(self) -> str:
        return "NoPress()"


class Uniform(Press):
    """Every KV head keeps the same number of tokens: its own top n_kept.

    ``Uniform(SnapKV(), 0.5)`` is kvpress's ``snapkv``: per (row, head), Top-K with K = n_kept.
    """

    def keep_mask(self, scores, inputs, n_kept):
        return topk_mask(scores, n_kept), 0
