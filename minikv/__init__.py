"""minikv: KV-cache compression for LLMs -- SnapKV, AdaKV and CriticalAdaKV -- small and readable.

Scorers (``minikv.scorers``) say how important each token is; policies (``minikv.policies``)
decide how many tokens each KV head keeps. ``AdaKV(SnapKV(), 0.5)`` reads like the sentence:
"AdaKV wraps the SnapKV scorer".
"""

from .budget import head_ceiling, n_kept, n_safe
from .policies import AdaKV, CriticalAdaKV, CriticalKV, NoPress, Press, Selection, Uniform
from .registry import MAIN_PRESSES, get_press, press_names
from .scorers import KNorm, LayerInputs, RandomScorer, Scorer, SnapKV, StreamingLLM, snapkv_scores

__version__ = "0.1.0"

__all__ = [
    "n_kept", "n_safe", "head_ceiling",
    "Press", "Selection", "NoPress", "Uniform", "AdaKV", "CriticalKV", "CriticalAdaKV",
    "Scorer", "LayerInputs", "SnapKV", "snapkv_scores", "RandomScorer", "StreamingLLM", "KNorm",
    "get_press", "press_names", "MAIN_PRESSES",
]


def __getattr__(name):  # the model-facing API loads transformers only when asked for
    if name in ("load_model", "generate", "apply_press", "attach", "GenerationResult"):
        from . import hf

        return getattr(hf, name)
    if name in ("RaggedCache", "ListStore"):
        from . import cache

        return getattr(cache, name)
    if name in ("demo", "tasks", "hf", "cache", "exercises", "gpu", "evaluate"):  # submodules, on first use
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'minikv' has no attribute {name!r}")
