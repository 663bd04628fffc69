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


# --------------------------------------------------------------------------------------------
# natural text, cut in tokens (held-out fidelity and continuation tasks)
# --------------------------------------------------------------------------------------------
def natural_text() -> str:
    """Long, non-repetitive English, the same on every machine: minikv/data/python_docs.txt.gz (the
    documentation that ships with CPython -- pydoc's help topics and standard-library docstrings,
    PSF License; made by scripts/make_natural_text.py), then minikv's own prose (harbour_town.txt)."""
    import gzip

    docs = gzip.decompress((DATA_DIR / "python_docs.txt.gz").read_bytes()).decode("utf-8")
    return docs.split("\n\n", 1)[1] + "\n\n" + "\n\n".join(prose_paragraphs())  # without the header line


def natural_text_windows(tok, n_tokens: int, n_cont: int, n: int):
    """n disjoint windows of ``n_tokens + n_cont`` tokens of :func:`natural_text`: (n, n_tokens + n_cont) ids.

    The first n_tokens of a row are the (compressed) context, the rest its true continuation.
    Windows do not overlap, so samples share no tokens; asking for more than the text holds is an error.
    """
    import torch

    ids = tok(natural_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = n_tokens + n_cont
    have = len(ids) // width
    if n > have:
        raise ValueError(f"the natural text holds {have} disjoint windows of {width} tokens; asked for n = {n} samples")
    return torch.stack([ids[i * width:(i + 1) * width] for i in range(n)])  # (n, width)


# --------------------------------------------------------------------------------------------
# question-agnostic QA: facts with distractors in natural prose, several questions per context
# --------------------------------------------------------------------------------------------
FIRST_NAMES = ["Orla", "Tomas", "Wen", "Priya", "Jonas", "Ines", "Kofi", "Mei", "Lars", "Amara", "Diego", "Hana",
               "Felix", "Noor", "Ivan", "Rosa", "Emil", "Yara", "Omar", "Lena", "Kai", "Zofia", "Ravi", "Greta"]
LAST_NAMES = ["Penhale", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Castell", "Brandt", "Haddad", "Novak",
              "Quint", "Falk", "Serrano", "Whitlow", "Aldana", "Kerrigan", "Voss"]
#: template -> (fact, question, answer prefix, values); the answer is the value, copied after the prefix
QA_TEMPLATES = {
    "town": ("{name} lives in the town of {v}.", "In which town does {name} live?", "{name} lives in the town of",
             ["Aberdale", "Corrin Bay", "Westmoor", "Pellham", "Dunraven", "Ashcombe", "Kilmory", "Tarrow",
              "Brightwater", "Elmsford", "Harlow End", "Oakhurst"]),
    "boat": ("{name} owns a small boat called the {v}.", "What is {name}'s boat called?", "{name} owns a small boat called the",
             ["Grey Heron", "Silver Gull", "Morning Star", "Red Fox", "Quiet Tide", "Blue Lantern", "Swift Otter",
              "Old Compass", "Green Kestrel", "Salt Wren"]),
    "job": ("{name} works as a {v}.", "What does {name} work as?", "{name} works as a",
            ["carpenter", "pharmacist", "surveyor", "librarian", "beekeeper", "glassblower", "harbour pilot",
             "bookbinder", "clockmaker", "cartographer"]),
    "pet": ("{name} has a cat named {v}.", "What is the name of {name}'s cat?", "{name} has a cat named",
            ["Pepper", "Mango", "Biscuit", "Juniper", "Sable", "Tofu", "Clementine", "Marble", "Pickle", "Saffron"]),
    "number": ("The locker of {name} is number {v}.", "What is the number of {name}'s locker?",
               "The locker of {name} is number",
               [str(n) for n in range(214, 990, 37)]),
}
QA_INSTRUCTION = "Read the notes below carefully; questions about the people in them follow.\n\n"


@dataclass
class QASample:
    """One question-agnostic QA context: token ids of the compressed part and its questions."""

    sample_id: int
    context_ids: list  # token ids of the compressed part (chat-template start + instruction + notes), len n_tokens
    questions: list  # [{"template", "question_ids", "prefix_ids", "answer_ids", "answer", "depth"}]
    instruction_tokens: int  # how many leading tokens are template + instruction (not notes)


def _ids(tok, text: str) -> list:
    return tok(text, add_special_tokens=False).input_ids


def qa_sample(tok, sample_id: int, n_tokens: int = 1024, n_questions: int = 4, n_distractors: int = 1, seed: int = 0) -> QASample:
    """Facts about people ("Orla Penhale owns a small boat called the Grey Heron.") spread through
    natural prose; each asked fact has ``n_distractors`` facts of the same template about other people.

    Built in tokens, so every sample of a length has exactly ``n_tokens`` compressed tokens (batch rows
    of equal length); the prose filler is natural_text() from a seeded offset. The questions come
    after compression (question-agnostic, kvpress's default), each followed by the chat template's
    assistant turn and an answer prefix that repeats the fact's wording, so the gold answer is the
    next tokens and can be scored by teacher forcing.
    """
    rng = _rng("qa", n_tokens, n_questions, n_distractors, seed, sample_id)
    n_people = n_questions * (1 + n_distractors)
    if n_people > min(len(FIRST_NAMES), len(LAST_NAMES)):
        raise ValueError(f"qa: {n_people} people need as many distinct first and last names")
    # no two people share a first or a last name: a distractor differs from the asked person in both
    names = [f"{f} {l}" for f, l in zip(rng.sample(FIRST_NAMES, n_people), rng.sample(LAST_NAMES, n_people))]
    templates = rng.sample(sorted(QA_TEMPLATES), n_questions)
    facts, questions = [], []
    for qi, t in enumerate(templates):
        fact, question, prefix, values = QA_TEMPLATES[t]
        vals = rng.sample(values, 1 + n_distractors)
        who = names[qi * (1 + n_distractors):(qi + 1) * (1 + n_distractors)]
        for j, (name, v) in enumerate(zip(who, vals)):
            facts.append((qi if j == 0 else None, fact.format(name=name, v=v)))
        questions.append(dict(template=t, name=who[0], question=question.format(name=who[0]),
                              prefix=prefix.format(name=who[0]), answer=vals[0]))
    rng.shuffle(facts)
    # template start + instruction, then notes = prose with the facts at seeded places
    head = _chat_prefix(tok) + _ids(tok, QA_INSTRUCTION)
    fact_ids = [(qi, _ids(tok, " " + f)) for qi, f in facts]
    n_fill = n_tokens - len(head) - sum(len(x) for _, x in fact_ids)
    if n_fill < 32:
        raise ValueError(f"qa:{n_tokens} is too short for {len(facts)} facts; use more tokens")
    text_ids = _natural_ids(tok)
    start = rng.randrange(0, len(text_ids) - n_fill)
    filler = text_ids[start:start + n_fill]
    # facts go in after a token that ends a sentence or a line, so none cuts a sentence in two
    ends = [i + 1 for i, t in enumerate(filler[:-1]) if _ends_sentence(tok, t)]
    if len(ends) < len(fact_ids):
        ends = list(range(1, n_fill))
    cuts = sorted(rng.sample(ends, len(fact_ids)))
    body, depth, prev = [], {}, 0
    for (qi, f), c in zip(fact_ids, cuts):
        body += filler[prev:c]
        if qi is not None:
            depth[qi] = round(c / n_fill, 3)
        body += f
        prev = c
    body += filler[prev:]
    ctx = head + body
    assert len(ctx) == n_tokens, (len(ctx), n_tokens)
    suffix = _chat_suffix(tok)
    for qi, q in enumerate(questions):
        q["question_ids"] = _ids(tok, "\n\n" + q.pop("question")) + suffix
        q["prefix_ids"] = _ids(tok, q.pop("prefix"))
        q["answer_ids"] = _ids(tok, " " + q["answer"])
        q["depth"] = depth[qi]
    return QASample(sample_id, ctx, questions, len(head))


_CACHE: dict = {}


def _ends_sentence(tok, token_id: int) -> bool:
    key = ("end", getattr(tok, "name_or_path", id(tok)), token_id)
    if key not in _CACHE:
        text = tok.decode([token_id])
        _CACHE[key] = text.rstrip(" ").endswith((".", "\n", ":", "?", "!"))
    return _CACHE[key]


def _natural_ids(tok) -> list:
    key = ("natural", getattr(tok, "name_or_path", id(tok)))
    if key not in _CACHE:
        _CACHE[key] = _ids(tok, natural_text())
    return _CACHE[key]


def _chat_prefix(tok) -> list:
    """Token ids of the chat template up to where the user's message starts (empty without a template)."""
    from .hf import split_chat_template

    ctx, _ = split_chat_template(tok, "", "")
    return ctx[0].tolist()


def _chat_suffix(tok) -> list:
    """Token ids of the chat template after the user's message: end of turn + assistant header."""
    from .hf import split_chat_template

    _, after = split_chat_template(tok, "", "")
    return after[0].tolist()
