"""Long-context tasks made on the fly from seeds and text that ships with minikv (no downloads)."""

from __future__ import annotations

import random

FILLER_SENTENCES = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "A river runs through the valley.", "The old clock ticks on the wall.", "Bread is baked every morning.",
    "Clouds drift slowly over the hills.", "The library opens at nine.",
]


def filler(n_sentences: int, seed: int = 0) -> str:
    """Plain, repetitive text: the haystack."""
    rng = random.Random(seed)
    return " ".join(rng.choice(FILLER_SENTENCES) for _ in range(n_sentences))


def passkey_example(n_sentences: int = 120, depth: float = 0.5, seed: int = 0):
    """(context, question, answer): a 5-digit pass key hidden at ``depth`` (0 = start, 1 = end) of filler text.

    About 5.5 tokens per sentence for SmolLM2, so 120 sentences ~ 700 tokens.
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    cut = int(n_sentences * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context = " ".join(s for s in (filler(cut, seed + 1), needle, filler(n_sentences - cut, seed + 2)) if s)
    return context, "What is the pass key?", key
