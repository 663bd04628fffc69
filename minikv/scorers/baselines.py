"""Simple scorers that need no attention: the baselines every press is compared against."""

from __future__ import annotations

import torch

from .base import LayerInputs, Scorer


class RandomScorer(Scorer):
    """Uniform random scores: what any real scorer must beat. Seeded, so runs repeat."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        b, n_kv, L = inputs.keys.shape[:3]
        # one generator per batch row, so a row's scores do not depend on the rest of the batch
        rows = [torch.rand(n_kv, L, generator=torch.Generator().manual_seed(self.seed + 7919 * r)) for r in range(b)]
        return torch.stack(rows).to(inputs.keys.device)  # (b, n_kv, L)


class StreamingLLM(Scorer):
    """StreamingLLM (Xiao et al., 2023): keep the first ``n_sink`` "attention sink" tokens and the most recent ones.

    Written as a score so that any policy can use it: sinks score highest, then later tokens
    score higher than earlier ones. Top-n_kept therefore keeps the sinks + the last n_kept - n_sink.

    >>> StreamingLLM(n_sink=2).score(LayerInputs(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2)))
    tensor([[[12., 13.,  2.,  3.,  4.,  5.]]])
    """

    def __init__(self, n_sink: int = 4):
        if not isinstance(n_sink, int) or n_sink < 0:
            raise ValueError(f"n_sink must be an integer >= 0, got {n_sink!r}")
        self.n_sink = n_sink

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        b, n_kv, L = inputs.keys.shape[:3]
        pos = torch.arange(L, dtype=torch.float32, device=inputs.keys.device)
        pos[: self.n_sink] += 2 * L  # sinks above every recent token
        return pos.expand(b, n_kv, L).clone()  # (b, n_kv, L)


class KNorm(Scorer):
    """Keys with a *small* L2 norm tend to receive large attention (Devoto et al., 2024): score = -||k||."""

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1).to(inputs.keys.dtype)  # (b, n_kv, L)
