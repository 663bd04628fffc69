"""Policies: given a scorer's scores, decide which tokens each KV head keeps.

A *press* in minikv is a policy wrapped around a scorer -- ``Uniform(SnapKV())`` is kvpress's
``snapkv``, ``AdaKV(SnapKV())`` its ``adakv_snapkv``. Every policy returns a :class:`Selection`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import check_int, check_ratio, n_kept
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


def rank_order(scores: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Indices that sort the last axis by score, highest first; ties go to the most recent token.

    Exact ties are common, not rare: SnapKV gives all its window tokens the same score (max + 1),
    and AdaKV's safeguard gives n_safe tokens per head the dtype's max. ``torch.topk`` leaves the
    order of tied entries to the implementation (it differs between devices and versions), so
    minikv breaks ties itself: the larger ``positions`` value first (default: the index along the
    last axis, i.e. the most recent token), then the lower index.

    >>> rank_order(torch.tensor([[1., 3., 3., 2.]]))
    tensor([[2, 1, 3, 0]])
    """
    n = scores.shape[-1]
    if positions is None:
        positions = torch.arange(n, device=scores.device)
    recent_first = positions.argsort(descending=True, stable=True)  # (n,) the tie-break order
    order = scores.index_select(-1, recent_first).argsort(dim=-1, descending=True, stable=True)  # stable: keeps it
    return recent_first[order]


def topk_mask(scores: torch.Tensor, k: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last axis (ties: most recent first, see rank_order).

    >>> topk_mask(torch.tensor([[1., 5., 2., 9.]]), 2)
    tensor([[False,  True, False,  True]])
    >>> topk_mask(torch.tensor([[7., 7., 7., 7.]]), 2)   # a tie: the two most recent tokens
    tensor([[False, False,  True,  True]])
    """
    check_int("k", k, minimum=0, maximum=scores.shape[-1])
    idx = rank_order(scores, positions)[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def topk_mask_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Keep the top ``budgets[r, h]`` tokens of each (row, head): a Top-K whose K differs per head.

    scores (b, n_kv, L), budgets (b, n_kv) -> (b, n_kv, L) bool. Ties: most recent first, as topk_mask.
    """
    order = rank_order(scores)  # (b, n_kv, L)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < budgets[..., None]


def _check_scores(scores, inputs: LayerInputs, scorer) -> None:
    """A scorer's output: a finite floating-point (b, n_kv, L) tensor on the keys' device."""
    want = tuple(inputs.keys.shape[:3])
    name = type(scorer).__name__
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != want or not scores.is_floating_point():
        got = f"{scores.dtype} {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{name}.score must return a floating-point tensor of shape (b, n_kv, L) = {want}, got {got}")
    if scores.device != inputs.keys.device:
        raise ValueError(f"{name}.score returned scores on {scores.device}, the keys are on {inputs.keys.device}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}.score returned NaN or inf scores; the ranking would be meaningless")


class Press:
    """Base policy. Subclasses implement :meth:`keep_mask`.

    ``press.select(inputs)`` works on plain tensors; ``with press(model):`` compresses a
    Hugging Face model's KV cache during prefill (see ``minikv.hf``).
    """

    def __init__(self, scorer: Scorer | None, compression_ratio: float = 0.0):
        if scorer is not None and not isinstance(scorer, Scorer):
            raise TypeError(f"scorer must be a minikv Scorer (e.g. SnapKV()), got {type(scorer).__name__}")
        self.compression_ratio = check_ratio(compression_ratio)
        if scorer is None and self.compression_ratio > 0:
            raise ValueError(
                f"{type(self).__name__} needs a scorer to compress at compression_ratio={self.compression_ratio}: "
                f"got scorer=None (e.g. {type(self).__name__}(SnapKV(), {self.compression_ratio}); "
                "NoPress() keeps every token)"
            )
        self.scorer = scorer

    # -- the policy -------------------------------------------------------------------------
    def keep_mask(self, scores: torch.Tensor, inputs: LayerInputs, n_kept: int) -> tuple[torch.Tensor, int]:
        """Return (keep mask (b, n_kv, L), n_safe)."""
        raise NotImplementedError

    def select(self, inputs: LayerInputs) -> Selection:
        """Score the layer, then decide what each head keeps."""
        if not isinstance(inputs, LayerInputs):
            raise TypeError(f"select() takes a minikv LayerInputs, got {type(inputs).__name__}")
        L = inputs.context_length
        if self.scorer is None or self.compression_ratio == 0:
            keep = torch.ones(inputs.keys.shape[:3], dtype=torch.bool, device=inputs.keys.device)
            return Selection(keep, None, L)
        self.check(L)
        k = n_kept(L, self.compression_ratio)
        self.scorer.check_budget(k, L)
        scores = self.scorer.score(inputs)  # (b, n_kv, L)
        _check_scores(scores, inputs, self.scorer)
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
        if check_ratio(compression_ratio) != 0:
            raise ValueError(
                f"no_press keeps every token, so its compression_ratio must be 0, got {compression_ratio}; "
                "pick a press that compresses (e.g. get_press('snapkv', compression_ratio=...))"
            )
        super().__init__(None, 0.0)

    def __repr__(self) -> str:
        return "NoPress()"


class Uniform(Press):
    """Every KV head keeps the same number of tokens: its own top n_kept.

    ``Uniform(SnapKV(), 0.5)`` is kvpress's ``snapkv``: per (row, head), Top-K with K = n_kept.
    """

    def keep_mask(self, scores, inputs, n_kept):
        return topk_mask(scores, n_kept), 0
