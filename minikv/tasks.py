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


# --------------------------------------------------------------------------------------------
# evaluation tasks (python -m minikv eval): made from a seed, so every run sees the same samples
# --------------------------------------------------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

#: Haystack sentences that are each exactly 6 SmolLM2 tokens with their leading space, so that any
#: two haystacks of the same number of sentences have the same token length: batch rows of equal
#: length without padding (other tokenizers still work, in smaller batches).
HAYSTACK_SENTENCES = [
    "The grass is green today.", "The sky is very blue.", "Bread is baked every morning.",
    "Clouds drift over the hills.", "The library opens at nine.", "The baker sells fresh rolls.",
    "The train leaves at noon.", "Children play in the park.", "Leaves fall in the autumn.",
    "The bridge crosses the river.", "Snow covers the high peaks.", "The farmer feeds the goats.",
    "The teacher reads a story.", "The garden has many roses.", "Wind blows across the field.",
    "The shop closes at six.", "The door is painted red.", "A letter arrives each week.",
    "Bees hum among the flowers.", "The ferry crosses the bay.", "The mountain air is fresh.",
    "Tea is served at four.", "The fence needs new paint.", "The museum has old maps.",
    "Horses graze in the meadow.",
]
TOKENS_PER_SENTENCE = 6  # for SmolLM2; only used to size a haystack to roughly n_tokens
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)  # needle depths, cycled over sample ids
DATA_DIR = Path(__file__).parent / "data"


@dataclass
class Sample:
    """One evaluation item. ``answer`` is the expected string; for "fidelity" there is none."""

    task: str  # "passkey", "multifact" or "fidelity"
    length: int  # the context length asked for, in tokens (approximate for text tasks)
    sample_id: int
    context: str
    question: str = ""
    answer: str = ""
    depth: float | None = None  # where the needle sits, 0 = start, 1 = end
    meta: dict = field(default_factory=dict)


def _rng(*parts) -> random.Random:
    # a str seed is hashed with sha512 by `random`: the same on every machine and run
    return random.Random(":".join(str(p) for p in parts))


def _haystack(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(HAYSTACK_SENTENCES) for _ in range(n)]


def _insert(sentences: list[str], depth: float, item: str) -> list[str]:
    cut = round(len(sentences) * depth)
    return sentences[:cut] + [item] + sentences[cut:]


def passkey_sample(sample_id: int, n_tokens: int = 1024, seed: int = 0) -> Sample:
    """A 5-digit pass key hidden at depth DEPTHS[sample_id % 5] in ~n_tokens of haystack.

    >>> s = passkey_sample(0, 256); s.answer in s.context, s.depth
    (True, 0.1)
    """
    rng = _rng("passkey", n_tokens, seed, sample_id)
    key = str(rng.randint(10000, 99999))
    depth = DEPTHS[sample_id % len(DEPTHS)]
    n = max(4, (n_tokens - 72) // TOKENS_PER_SENTENCE)  # ~72 tokens: chat template, intro, needle
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    body = _insert(_haystack(rng, n), depth, needle)
    context = "There is a pass key hidden in the text below. Remember it. " + " ".join(body)
    return Sample("passkey", n_tokens, sample_id, context, "\n\nWhat is the pass key?", key, depth)


def multifact_sample(sample_id: int, n_tokens: int = 1024, n_facts: int = 6, seed: int = 0) -> Sample:
    """Several facts "The code of room R is C." spread through a haystack; the question asks for one.

    Rooms are distinct 3-digit numbers, codes distinct 4-digit numbers, so every other fact is a
    distractor of the same shape. The asked fact sits at depth DEPTHS[sample_id % 5].
    """
    rng = _rng("multifact", n_tokens, n_facts, seed, sample_id)
    rooms = rng.sample(range(100, 1000), n_facts)
    codes = [str(c) for c in rng.sample(range(1000, 10000), n_facts)]
    target = rng.randrange(n_facts)
    depth = DEPTHS[sample_id % len(DEPTHS)]
    n = max(n_facts + 4, (n_tokens - 50 - 15 * n_facts) // TOKENS_PER_SENTENCE)
    body = _haystack(rng, n)
    others = [i for i in range(n_facts) if i != target]
    for i in others:  # distractors anywhere
        body = _insert(body, rng.random(), f"The code of room {rooms[i]} is {codes[i]}.")
    body = _insert(body, depth, f"The code of room {rooms[target]} is {codes[target]}.")
    context = "Below are the door codes of several rooms, hidden in other text. Remember them. " + " ".join(body)
    return Sample("multifact", n_tokens, sample_id, context, f"\n\nWhat is the code of room {rooms[target]}?",
                  codes[target], depth, {"room": rooms[target], "distractors": [codes[i] for i in others]})


def prose_paragraphs() -> list[str]:
    """The shipped prose (minikv/data/harbour_town.txt, written for minikv): one string per paragraph."""
    text = (DATA_DIR / "harbour_town.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def fidelity_sample(sample_id: int, n_tokens: int = 768, seed: int = 0) -> Sample:
    """Ordinary text: the shipped paragraphs in a seeded order (~1080 SmolLM2 tokens in all).

    The evaluator cuts it in tokens: the first n_tokens are the (compressed) context, the next ones
    the teacher-forced continuation whose next-token distributions are compared with the full cache.
    """
    paragraphs = prose_paragraphs()
    _rng("fidelity", seed, sample_id).shuffle(paragraphs)
    return Sample("fidelity", n_tokens, sample_id, "\n\n".join(paragraphs))


TASKS = {"passkey": passkey_sample, "multifact": multifact_sample, "fidelity": fidelity_sample}


def make_samples(task: str, n_tokens: int, n: int, seed: int = 0) -> list[Sample]:
    """The first n samples of a task at a context length: ``make_samples("passkey", 2048, 100)``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return [TASKS[task](i, n_tokens, seed=seed) for i in range(n)]
