"""Policies: how many tokens each KV head keeps, and which."""

from .adakv import AdaKV, adakv_budgets, adakv_keep_mask
from .base import NoPress, Press, Selection, Uniform, topk_mask, topk_mask_per_head
from .critical import CriticalAdaKV, CriticalKV, critical_scores, projected_value_norm

__all__ = ["Press", "Selection", "NoPress", "Uniform", "AdaKV", "CriticalKV", "CriticalAdaKV",
           "adakv_keep_mask", "adakv_budgets", "projected_value_norm", "critical_scores",
           "topk_mask", "topk_mask_per_head"]
