"""kvpress's press names -> minikv presses.

``adakv_<scorer>``, ``critical_<scorer>`` and ``critical_adakv_<scorer>`` work for every scorer,
because AdaKV and CriticalKV are policies that wrap *any* scorer.

>>> get_press("adakv_snapkv", compression_ratio=0.5)
AdaKV(SnapKV(window_size=64, kernel_size=5, pooling='avg'), compression_ratio=0.5, alpha_safeguard=0.2)
"""

from __future__ import annotations

from .policies import AdaKV, CriticalAdaKV, CriticalKV, NoPress, Press, Uniform
from .scorers import KNorm, RandomScorer, SnapKV, StreamingLLM

SCORERS = {
    "random": RandomScorer,
    "streaming_llm": StreamingLLM,
    "knorm": KNorm,
    "snapkv": SnapKV,
}

POLICIES = {  # name prefix -> policy class
    "": Uniform,
    "adakv_": AdaKV,
    "critical_": CriticalKV,
    "critical_adakv_": CriticalAdaKV,
}

#: the presses of the user's notes and of the evaluation, in the order plots show them
MAIN_PRESSES = ["no_press", "random", "streaming_llm", "knorm", "snapkv", "adakv_snapkv",
                "critical_snapkv", "critical_adakv_snapkv"]


def press_names() -> list[str]:
    """Every name ``get_press`` accepts."""
    return ["no_press"] + [prefix + s for prefix in POLICIES for s in SCORERS]


def get_press(name: str, compression_ratio: float = 0.0, **scorer_kwargs) -> Press:
    """Build a press by its kvpress name, e.g. ``get_press("adakv_snapkv", compression_ratio=0.5)``.

    Extra keyword arguments go to the scorer (``window_size=32`` for SnapKV, ``n_sink=4`` ...).
    """
    if name == "no_press":
        return NoPress(compression_ratio)
    # longest prefix first: "critical_adakv_" before "critical_" before ""
    for prefix in sorted(POLICIES, key=len, reverse=True):
        if name.startswith(prefix) and name[len(prefix):] in SCORERS:
            scorer = SCORERS[name[len(prefix):]](**scorer_kwargs)
            return POLICIES[prefix](scorer, compression_ratio)
    raise ValueError(f"unknown press name {name!r}; known presses: {', '.join(press_names())}")
