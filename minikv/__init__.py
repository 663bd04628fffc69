"""minikv: KV-cache compression for LLMs -- SnapKV, AdaKV and CriticalAdaKV -- small and readable.

Scorers (``minikv.scorers``) say how important each token is; policies (``minikv.policies``)
decide how many tokens each KV head keeps. ``AdaKV(SnapKV(), 0.5)`` reads like the sentence:
"AdaKV wraps the SnapKV scorer".
"""

import importlib

from .budget import head_ceiling, n_kept, n_safe
from .registry import MAIN_PRESSES, get_press, press_names

__version__ = "0.1.0"

__all__ = [
    "n_kept", "n_safe", "head_ceiling",
    "Press", "Selection", "NoPress", "Uniform", "AdaKV", "CriticalKV", "CriticalAdaKV",
    "Scorer", "LayerInputs", "SnapKV", "snapkv_scores", "RandomScorer", "StreamingLLM", "KNorm",
    "get_press", "press_names", "MAIN_PRESSES",
]

# imported on first use, so that `import minikv` (and `python -m minikv --help`) needs no torch
_LAZY = {
    **dict.fromkeys(["Press", "Selection", "NoPress", "Uniform", "AdaKV", "CriticalKV", "CriticalAdaKV"], "policies"),
    **dict.fromkeys(["Scorer", "LayerInputs", "SnapKV", "snapkv_scores", "RandomScorer", "StreamingLLM", "KNorm"],
                    "scorers"),
    **dict.fromkeys(["load_model", "generate", "apply_press", "attach", "detach", "attached", "GenerationResult"], "hf"),
    **dict.fromkeys(["RaggedCache", "ListStore"], "cache"),
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in ("demo", "tasks", "hf", "cache", "exercises", "gpu", "evaluate", "fidelity", "stats", "diagrams", "cli"):  # submodules, on first use
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'minikv' has no attribute {name!r}")
