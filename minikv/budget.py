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
import numbers


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer in [minimum, maximum], else raise naming ``name``.

    ``bool`` is refused although Python counts it as an int: ``window_size=True`` is a mistake, not 1.

    >>> check_int("window_size", 64, minimum=1)
    64
    """
    lo = "" if minimum is None else f" >= {minimum}"
    hi = "" if maximum is None else f" <= {maximum}"
    allowed = f"an integer{lo}{' and' if lo and hi else ''}{hi}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number in [lo, hi] (hi excluded if ``hi_open``).

    >>> check_number("epsilon", 1e-4, lo=0)
    0.0001
    """
    if lo is not None and hi is not None:
        allowed = f"a number in [{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"a finite number >= {lo}"
    else:
        allowed = "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    v = float(value)
    too_high = hi is not None and (v >= hi if hi_open else v > hi)
    if not math.isfinite(v) or (lo is not None and v < lo) or too_high:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return v


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
    check_int("context_length", context_length, minimum=1)
    return max(1, int(context_length * (1 - check_ratio(compression_ratio))))


def n_safe(n_kept: int, alpha_safeguard: float) -> int:
    """AdaKV's safeguard floor: ``floor(alpha * n_kept)``, and at least 1 when alpha > 0.

    >>> n_safe(50, 0.2), n_safe(3, 0.2), n_safe(50, 0.0), n_safe(50, 1.0)
    (10, 1, 0, 50)
    """
    check_int("n_kept", n_kept, minimum=1)
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
