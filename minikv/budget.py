"""How many tokens a head keeps: the arithmetic every policy shares.

Two numbers drive every press in minikv:

* ``n_kept``  -- the per-head budget (uniform) or the per-head *average* budget (adaptive);
* ``n_safe``  -- AdaKV's safeguard: the floor every head keeps whatever the scores say.

>>> n_kept(100, 0.5), n_safe(50, 0.2)
(50, 10)
>>> n_kept(90, 0.3)          # floor of 90 * 0.7 = 62.99..., computed with Python floats
62
"""

from __future__ import annotations

import math


def check_ratio(compression_ratio: float) -> float:
    """Return ``compression_ratio`` as a float, or raise if it is outside [0, 1)."""
    if isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float)):
        raise TypeError(f"compression_ratio must be a number in [0, 1), got {compression_ratio!r}")
    if not (0.0 <= compression_ratio < 1.0) or math.isnan(compression_ratio):
        raise ValueError(
            f"compression_ratio must be in [0, 1) (the fraction of tokens removed; 0 keeps everything), "
            f"got {compression_ratio}"
        )
    return float(compression_ratio)


def check_alpha(alpha_safeguard: float) -> float:
    """Return ``alpha_safeguard`` as a float, or raise if it is outside [0, 1]."""
    if isinstance(alpha_safeguard, bool) or not isinstance(alpha_safeguard, (int, float)):
        raise TypeError(f"alpha_safeguard must be a number in [0, 1], got {alpha_safeguard!r}")
    if not (0.0 <= alpha_safeguard <= 1.0):
        raise ValueError(f"alpha_safeguard must be in [0, 1] (fraction of n_kept every head keeps), got {alpha_safeguard}")
    return float(alpha_safeguard)


def n_kept(context_length: int, compression_ratio: float) -> int:
    """Tokens kept per head: ``max(1, floor(L * (1 - cr)))``.

    Computed with Python floats exactly as kvpress does, so ``n_kept(90, 0.3) == 62``
    (``90 * 0.7 == 62.99999999999999``), not 63.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    return max(1, int(context_length * (1 - check_ratio(compression_ratio))))


def n_safe(n_kept: int, alpha_safeguard: float) -> int:
    """AdaKV's safeguard floor: ``floor(alpha * n_kept)``, and at least 1 when alpha > 0.

    >>> n_safe(50, 0.2), n_safe(3, 0.2), n_safe(50, 0.0), n_safe(50, 1.0)
    (10, 1, 0, 50)
    """
    alpha = check_alpha(alpha_safeguard)
    floor = int(n_kept * alpha)
    return max(1, floor) if alpha > 0 else 0


def head_ceiling(n_kept: int, n_safe: int, n_kv: int, context_length: int) -> int:
    """The most tokens one head can keep under AdaKV: every other head sits at its floor.

    ``min(L, n_safe + n_kv * (n_kept - n_safe))`` -- the n_kv * n_kept pairs of the layer,
    minus the (n_kv - 1) * n_safe that the other heads must keep.

    >>> head_ceiling(50, 10, 4, 100)   # the worked example: one head could take all 100
    100
    >>> head_ceiling(10, 2, 4, 100)
    34
    """
    return min(context_length, n_safe + n_kv * (n_kept - n_safe))
