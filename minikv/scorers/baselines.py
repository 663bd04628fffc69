"""Simple scorers that need no attention: the baselines every press is compared against."""

from __future__ import annotations

import hashlib

import torch

from ..budget import check_int
from .base import LayerInputs, Scorer


class RandomScorer(Scorer):
    """Uniform random scores: what any real scorer must beat. Seeded, so runs repeat.

    Each batch row draws from its own generator, seeded by ``seed`` and a fingerprint of the row's
    content (its context length and a few of its keys' bytes): a row gets the same scores -- and so
    keeps the same tokens -- wherever it sits in a batch, alone or not. Rows with identical keys get
    identical scores; different layers (different keys) get different ones.
    """

    #: token positions (and the last token) whose keys make up a row's fingerprint
    FINGERPRINT_POSITIONS = 8

    def __init__(self, seed: int = 0):
        self.seed = check_int("seed", seed, minimum=0)

    def row_seed(self, keys_row: torch.Tensor) -> int:
        """keys (n_kv, L, d) of one row -> a 64-bit generator seed from ``seed`` and the row's content."""
        L = keys_row.shape[1]
        pos = sorted({round(i * (L - 1) / max(1, self.FINGERPRINT_POSITIONS - 1)) for i in range(self.FINGERPRINT_POSITIONS)})
        sample = keys_row[:, pos].detach().to("cpu").contiguous()  # (n_kv, <= 8, d): a few hundred bytes to copy
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.seed}:{tuple(keys_row.shape)}:{keys_row.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())  # exact bits (bfloat16 included)
        return int.from_bytes(h.digest(), "little")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        b, n_kv, L = inputs.keys.shape[:3]
        rows = [torch.rand(n_kv, L, generator=torch.Generator().manual_seed(self.row_seed(inputs.keys[r])))
                for r in range(b)]
        return torch.stack(rows).to(inputs.keys.device)  # (b, n_kv, L)


class StreamingLLM(Scorer):
    """StreamingLLM (Xiao et al., 2023): keep the first ``n_sink`` "attention sink" tokens and the most recent ones.

    Written as a score so that any policy can use it: sinks score highest, then later tokens
    score higher than earlier ones. Top-n_kept therefore keeps the sinks + the last n_kept - n_sink.

    >>> StreamingLLM(n_sink=2).score(LayerInputs(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2)))
    tensor([[[12., 13.,  2.,  3.,  4.,  5.]]])
    """

    def __init__(self, n_sink: int = 4):
        self.n_sink = check_int("n_sink", n_sink, minimum=0)

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        b, n_kv, L = inputs.keys.shape[:3]
        pos = torch.arange(L, dtype=torch.float32, device=inputs.keys.device)
        pos[: self.n_sink] += 2 * L  # sinks above every recent token
        return pos.expand(b, n_kv, L).clone()  # (b, n_kv, L)


class KNorm(Scorer):
    """Keys with a *small* L2 norm tend to receive large attention (Devoto et al., 2024): score = -||k||."""

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        return -inputs.keys.float().norm(dim=-1).to(inputs.keys.dtype)  # (b, n_kv, L)
