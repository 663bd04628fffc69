"""kvpress's press names -> minikv presses.

``adakv_<scorer>``, ``critical_<scorer>`` and ``critical_adakv_<scorer>`` work for every scorer,
because AdaKV and CriticalKV are policies that wrap *any* scorer.

>>> get_press("adakv_snapkv", compression_ratio=0.5)
AdaKV(SnapKV(window_size=64, kernel_size=5, pooling='avg'), compression_ratio=0.5, alpha_safeguard=0.2)
>>> get_press("adakv_snapkv", 0.5, window_size=32, alpha_safeguard=0.1)  # scorer and policy options
AdaKV(SnapKV(window_size=32, kernel_size=5, pooling='avg'), compression_ratio=0.5, alpha_safeguard=0.1)

This module only names classes at import time (it imports no torch), so that the command line can
check a press name before it loads anything heavy; ``get_press`` imports the classes it builds.
"""

from __future__ import annotations

import importlib
import inspect

#: scorer name -> class name in minikv.scorers
SCORERS = {
    "random": "RandomScorer",
    "streaming_llm": "StreamingLLM",
    "knorm": "KNorm",
    "snapkv": "SnapKV",
}

#: name prefix -> policy class name in minikv.policies
POLICIES = {
    "": "Uniform",
    "adakv_": "AdaKV",
    "critical_": "CriticalKV",
    "critical_adakv_": "CriticalAdaKV",
}

#: the presses the lessons and the evaluation compare, in the order plots show them
MAIN_PRESSES = ["no_press", "random", "streaming_llm", "knorm", "snapkv", "adakv_snapkv",
                "critical_snapkv", "critical_adakv_snapkv"]


def press_names() -> list[str]:
    """Every name ``get_press`` accepts."""
    return ["no_press"] + [prefix + s for prefix in POLICIES for s in SCORERS]


def split_press_name(name: str) -> tuple[str, str]:
    """``"critical_adakv_snapkv"`` -> (policy class name, scorer class name); ValueError on an unknown name.

    Torch-free: the command line checks ``--press`` with it before loading the model.
    """
    if not isinstance(name, str):
        raise TypeError(f"press name must be a string, one of: {', '.join(press_names())}; got {name!r}")
    # longest prefix first: "critical_adakv_" before "critical_" before ""
    for prefix in sorted(POLICIES, key=len, reverse=True):
        if name.startswith(prefix) and name[len(prefix):] in SCORERS:
            return POLICIES[prefix], SCORERS[name[len(prefix):]]
    raise ValueError(f"unknown press name {name!r}; known presses: {', '.join(press_names())}")


def check_press_name(name: str) -> str:
    """Return ``name`` if ``get_press`` knows it, else raise a ValueError listing the known names."""
    if name != "no_press":
        split_press_name(name)
    return name


def get_press(name: str, compression_ratio: float = 0.0, **kwargs):
    """Build a press by its kvpress name, e.g. ``get_press("adakv_snapkv", compression_ratio=0.5)``.

    Extra keyword arguments go to the scorer (``window_size=32`` for SnapKV, ``n_sink=4`` ...) or to
    the policy (``alpha_safeguard=0.1`` for AdaKV, ``epsilon``/``first_stage_ratio`` for CriticalKV),
    whichever takes that name; any other name is an error that lists the ones allowed.
    ``no_press`` keeps every token: its ratio must be 0.
    """
    if name == "no_press":
        if kwargs:
            raise TypeError(f"no_press takes no options, got {', '.join(sorted(kwargs))}")
        return _cls("policies", "NoPress")(compression_ratio)
    policy_name, scorer_name = split_press_name(name)
    policy, scorer = _cls("policies", policy_name), _cls("scorers", scorer_name)
    policy_opts = set(inspect.signature(policy).parameters) - {"scorer", "compression_ratio"}
    scorer_opts = set(inspect.signature(scorer).parameters)
    unknown = set(kwargs) - policy_opts - scorer_opts
    if unknown:
        raise TypeError(f"get_press({name!r}) got unknown option(s) {', '.join(sorted(unknown))}; "
                        f"{scorer_name} takes {', '.join(sorted(scorer_opts)) or 'none'}, "
                        f"{policy_name} takes {', '.join(sorted(policy_opts)) or 'none'}")
    s = scorer(**{k: v for k, v in kwargs.items() if k in scorer_opts})
    return policy(s, compression_ratio, **{k: v for k, v in kwargs.items() if k in policy_opts})


def _cls(module: str, name: str):
    return getattr(importlib.import_module(f".{module}", __package__), name)
