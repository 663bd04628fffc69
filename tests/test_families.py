"""minikv on the model families it supports, offline: tiny random models built from transformers configs.

Each family is a 2-layer model (hidden 64, 4 query heads / 2 KV heads, a 64-word vocabulary)
with the architecture's own quirks switched on: Qwen2's q/k/v biases, Qwen3's per-head q/k norms,
Mistral's sliding-window mask, Phi-3's fused qkv_proj with head dim 24 and partial RoPE, Gemma-3's
head dim 256, query_pre_attn_scalar scaling and mixed sliding/full layers. Nothing is downloaded.
"""

import pytest
import torch

import minikv
from masked_reference import masked_reference_logits, spy_queries
from minikv.hf import attach, attached, cache_kwarg, capture_layers, detach, is_attached, split_chat_template
from minikv.scorers.snapkv import window_attention

VOCAB = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
COMMON = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # q_norm / k_norm per head
    "mistral": ("MistralConfig", dict(sliding_window=4096)),  # sliding-window mask on every layer
    "phi3": ("Phi3Config", dict(hidden_size=96, partial_rotary_factor=0.5)),  # fused qkv_proj, head dim 24, RoPE on half
    "gemma3": ("Gemma3TextConfig", dict(head_dim=256, query_pre_attn_scalar=24, sliding_window=192,
                                        layer_types=["sliding_attention", "full_attention"],
                                        initializer_range=0.02)),  # larger: greedy repeats one token
}
PRESSES = ["snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv", "knorm", "streaming_llm"]
WINDOW = 64  # SnapKV's window: the context must be longer


def build(family, attn_implementation="sdpa", **overrides):
    """A seeded tiny random model of ``family`` (float32, eval), optionally with config ``overrides``."""
    import transformers

    name, extra = FAMILIES[family] if family in FAMILIES else (family, {})
    config = getattr(transformers, name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer over VOCAB, built in memory (no chat template: context, then question + newline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def words(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 60, (n,), generator=g).tolist())


CONTEXT, QUESTION = words(144, seed=1), words(6, seed=2)  # n_kept at 0.5: 72 > WINDOW


def ids_of(tok, context=CONTEXT, question=QUESTION):
    return split_chat_template(tok, context, question)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine shared with other jobs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def greedy_reference(model, ids, max_new_tokens):
    """transformers' own greedy generation -> (new token ids, log-probabilities of every step (n, vocab))."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # (n, vocab)
    return out.sequences[0, ids.shape[1]:].tolist(), logprobs


@pytest.mark.parametrize("family", FAMILIES)
def test_no_press_generate_matches_transformers_greedy(family, tok):
    """Token for token, and the log-probabilities of every step (prefill, question, each decoded token)."""
    model = build(family)
    ctx_ids, q_ids = ids_of(tok)
    ref, ref_logprobs = greedy_reference(model, torch.cat([ctx_ids, q_ids], dim=1), 8)  # before minikv touches it
    res = minikv.generate(model, tok, CONTEXT, QUESTION, press=minikv.get_press("no_press"), max_new_tokens=8,
                          return_logprobs=True)
    got = res.token_ids[0].tolist()
    assert len(got) >= 1 and got == ref[: len(got)], f"{family}: minikv {got} vs transformers {ref}"
    torch.testing.assert_close(torch.cat(res.logprobs), ref_logprobs[: len(got)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_window_queries_are_the_models_own(family, tok):
    """The recomputed window queries are the queries the layer hands to attention, and SnapKV's window
    attention computed from them is the model's own (eager) attention of those rows."""
    model = build(family)
    ctx_ids, _ = ids_of(tok)
    seen = spy_queries(model, ctx_ids)
    captured = capture_layers(model, ctx_ids, n_queries=WINDOW)
    assert not is_attached(model) and model.config._attn_implementation == "sdpa", "capture_layers restores the model"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = model(input_ids=ctx_ids, output_attentions=True).attentions  # per layer (b, H, L, L)
    assert sorted(captured) == sorted(seen) == [0, 1]
    for i, inputs in captured.items():
        query, scaling = seen[i]
        d = query.shape[-1]
        factor = scaling * d**0.5  # != 1 only for Gemma-3 here (query_pre_attn_scalar 24, head dim 256)
        assert (abs(factor - 1) > 0.1) == (family == "gemma3")
        torch.testing.assert_close(inputs.queries, query[:, :, -WINDOW:] * factor, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(window_attention(inputs.queries, inputs.keys), weights[i][:, :, -WINDOW:],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", PRESSES)
def test_ragged_attention_equals_masked_dense(family, name, tok):
    model = build(family)
    ctx_ids, q_ids = ids_of(tok)
    press = minikv.get_press(name, 0.5)
    with torch.no_grad():
        cache, _ = minikv.hf.prefill(model, ctx_ids, press)
        ragged = model(input_ids=q_ids, use_cache=True, **{cache_kwarg(model): cache}).logits
        ref = masked_reference_logits(model, ctx_ids, q_ids, cache.selections)
    assert sorted(cache.selections) == [0, 1]
    assert (cache.kept_counts()[:, 0].sum(-1) == 2 * minikv.n_kept(ctx_ids.shape[1], 0.5) + 2 * q_ids.shape[1]).all()
    torch.testing.assert_close(ragged, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# what minikv refuses, by name -- and what it supports instead
# --------------------------------------------------------------------------------------------
def test_attention_logit_softcapping_is_refused():
    model = build("Gemma2Config", "eager", head_dim=32)  # Gemma-2 caps attention logits at 50 by default
    with pytest.raises(NotImplementedError, match="softcapping"):
        attach(model)
    assert not is_attached(model)
    attach(build("Gemma2Config", "eager", head_dim=32, attn_logit_softcapping=None))  # the same architecture without it attaches


def test_bidirectional_attention_is_refused():
    with pytest.raises(NotImplementedError, match="bidirectional"):
        attach(build("gemma3", use_bidirectional_attention=True))


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_compressing_beyond_a_sliding_window_is_refused(family, tok):
    model = build(family, sliding_window=32)  # the 144-token context is longer than the window
    ctx_ids, _ = ids_of(tok)
    with pytest.raises(NotImplementedError, match="sliding-window attention beyond the window.*layer 0.*32 tokens"):
        minikv.hf.prefill(model, ctx_ids, minikv.get_press("snapkv", 0.5))


def test_decoding_past_a_sliding_window_on_a_compressed_layer_is_refused(tok):
    model = build("mistral", sliding_window=152)  # 144 context + 6 question fit; the answer's 3rd token does not
    with pytest.raises(NotImplementedError, match="sliding-window attention beyond the window"):
        minikv.generate(model, tok, CONTEXT, QUESTION, press=minikv.get_press("snapkv", 0.5), max_new_tokens=8)
    res = minikv.generate(model, tok, CONTEXT, QUESTION, press=minikv.get_press("snapkv", 0.5), max_new_tokens=2)
    assert res.token_ids.shape[1] == 2


def test_no_press_beyond_a_sliding_window_is_transformers_own(tok):
    """Uncompressed layers keep transformers' sliding mask: no_press still equals transformers' greedy run."""
    model = build("mistral", sliding_window=32)
    ctx_ids, q_ids = ids_of(tok)
    ids = torch.cat([ctx_ids, q_ids], dim=1)
    ref, ref_logprobs = greedy_reference(model, ids, 6)
    res = minikv.generate(model, tok, CONTEXT, QUESTION, press=minikv.get_press("no_press"), max_new_tokens=6,
                          return_logprobs=True)
    got = res.token_ids[0].tolist()
    assert got == ref[: len(got)]
    torch.testing.assert_close(torch.cat(res.logprobs), ref_logprobs[: len(got)], atol=1e-5, rtol=0)
    with torch.no_grad():  # the same weights without a window answer differently: the window matters here
        full = build("mistral", sliding_window=None)(input_ids=ids).logits[:, -1]
    assert (torch.log_softmax(full, -1) - res.logprobs[0]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# attach / detach
# --------------------------------------------------------------------------------------------
def _pre_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in minikv.hf.attention_modules(model))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_detach_restores_the_model(impl, tok):
    model = build("llama", attn_implementation=impl)
    ctx_ids, _ = ids_of(tok)
    with torch.no_grad():
        before = model(input_ids=ctx_ids).logits
    hooks = _pre_hooks(model)
    attach(model)
    attach(model)  # idempotent
    assert is_attached(model) and model.config._attn_implementation == "minikv" and _pre_hooks(model) == hooks + 2
    detach(model)
    assert not is_attached(model) and model.config._attn_implementation == impl and _pre_hooks(model) == hooks
    detach(model)  # a no-op now
    with attached(model):
        assert model.config._attn_implementation == "minikv"
    assert model.config._attn_implementation == impl and _pre_hooks(model) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ctx_ids).logits, before, atol=1e-5, rtol=0)
    attach(model)
    with attached(model):  # a model attached before the block stays attached after it
        pass
    assert is_attached(model)


def test_output_attentions_while_attached(tok):
    """Uncompressed: the model's eager attention weights come back. Compressed: a clear error, not ``()``."""
    model = build("qwen3")
    ctx_ids, q_ids = ids_of(tok)
    eager = build("qwen3", attn_implementation="eager")
    with torch.no_grad():
        ref = eager(input_ids=ctx_ids, output_attentions=True).attentions
        with attached(model):
            got = model(input_ids=ctx_ids, output_attentions=True).attentions
            assert len(got) == len(ref) == 2
            for g, r in zip(got, ref):
                torch.testing.assert_close(g, r, atol=1e-6, rtol=0)
            cache, _ = minikv.hf.prefill(model, ctx_ids, minikv.get_press("snapkv", 0.5))
            with pytest.raises(ValueError, match="output_attentions=True: layer 0 is compressed"):
                model(input_ids=q_ids, use_cache=True, output_attentions=True, **{cache_kwarg(model): cache})
    # detached, a compressed cache is refused rather than read wrongly
    cache, _ = minikv.hf.prefill(model, ctx_ids, minikv.get_press("snapkv", 0.5))
    detach(model)
    with pytest.raises(RuntimeError, match="ragged"), torch.no_grad():
        model(input_ids=q_ids, use_cache=True, **{cache_kwarg(model): cache})


# --------------------------------------------------------------------------------------------
# loading: hub ids from the local cache, incomplete folders, the device
# --------------------------------------------------------------------------------------------
def save_tiny(folder, tok, model=True):
    """A tiny Qwen3 saved as a Hugging Face model folder (config, safetensors, tokenizer) -> the model.

    (Not Qwen2: transformers would read this word-level tokenizer back as a Qwen2Tokenizer.)"""
    m = build("qwen3")
    if model:
        m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return m


def test_load_model_by_hub_id_from_the_local_cache(tmp_path, monkeypatch, tok):
    import huggingface_hub.constants

    repo = tmp_path / "models--tiny-org--tiny-qwen3"  # the cache's layout: refs/main names the snapshot
    commit = "0123456789abcdef0123456789abcdef01234567"
    saved = save_tiny(repo / "snapshots" / commit, tok)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # read when the process starts

    model, tokenizer = minikv.load_model("tiny-org/tiny-qwen3")
    assert type(model).__name__ == "Qwen3ForCausalLM" and is_attached(model)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, ids_of(tok)[0])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved(input_ids=ids).logits, atol=1e-5, rtol=0)

    with pytest.raises(FileNotFoundError, match=r"nor a model in the local Hugging Face cache.*hf download tiny-org/absent"):
        minikv.load_model("tiny-org/absent")


def test_load_model_says_what_a_folder_lacks(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"missing: config.json .*; the weights .*; the tokenizer") as err:
        minikv.load_model(tmp_path)
    assert "sentencepiece" not in str(err.value)
    save_tiny(tmp_path, tok, model=False)  # a tokenizer, no model
    with pytest.raises(FileNotFoundError, match=r"missing: config.json \(the architecture\); the weights") as err:
        minikv.load_model(tmp_path)
    assert "tokenizer" not in str(err.value).split("missing:")[1].split(". A model folder")[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        minikv.load_model(tmp_path / "no" / "such" / "folder")


def test_load_model_checks_the_device_before_loading(tmp_path, monkeypatch, tok):
    import transformers

    save_tiny(tmp_path, tok)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the device was checked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    with pytest.raises(RuntimeError, match="device='cuda', but CUDA is not available"):
        minikv.load_model(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="device must be a torch device"):
        minikv.load_model(tmp_path, device="gpu")
