"""Scorers: how important is each token in each KV head? -> (b, n_kv, L)."""

from .base import DegenerateBudgetWarning, LayerInputs, Scorer
from .baselines import KNorm, RandomScorer, StreamingLLM
from .snapkv import SnapKV, snapkv_scores, window_attention

__all__ = ["LayerInputs", "Scorer", "DegenerateBudgetWarning", "SnapKV", "snapkv_scores", "window_attention", "RandomScorer", "StreamingLLM", "KNorm"]
