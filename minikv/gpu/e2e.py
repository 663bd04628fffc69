"""End-to-end decode on the GPU, full cache vs presses, every step a CUDA graph (``python -m minikv.gpu.e2e``).

Per model, in one run and side by side:

  dynamic_eager     transformers' DynamicCache + SDPA through the model's forward, eager (a torch.cat per layer per step)
  static_sdpa       a preallocated full cache, minikv's step (``decoder.StaticDecoder``), SDPA + length mask, CUDA graph
  static_triton     the same full cache through minikv's ragged kernel (every head keeps every token), CUDA graph
  compressed        per press and ratio: FlatStores + the ragged kernel, CUDA graph
  compressed_eager  (--eager-ratios) the model's forward on a RaggedCache, eager: the path before CUDA graphs
  <method>_<name>   (--step-variants) the same rows with other step settings (STEP_VARIANTS: with or without PDL,
                    Triton or cuBLAS matmuls); a baseline counts with its fastest variant in the speed-ups

Each row: ms/step = median over ``--repeats`` repeats of ``--steps`` steps (CUDA events; every repeat starts
from the same cache), spread = (max - min) / median, tokens/s = batch / step time, KV bytes held, and the
step's floor = (weight bytes + KV bytes read) / copy bandwidth, the copy measured in the same run.

Before timing, every graph decoder is checked over ``--check-steps`` tokens, teacher-forced so that errors
do not compound through diverging greedy paths: the model's own eager bf16 greedy decoding (transformers'
forward on a RaggedCache of the same stores, attention through PyTorch SDPA, not the Triton kernel) gives
the tokens; the same forward in float32 (on the same bf16 weights and kept keys/values, ``--check-rows`` batch
rows) and the decoder (its eager step and its graph replay) are fed those tokens. Two correct bf16
implementations differ by rounding order (run 1: ~1e-2 relative, and greedy tokens flip at near-ties), so the
decoder is judged against the float32 forward with the bf16 forward's own error as the yardstick
(``CHECK_CRITERION``, also in each run's JSON): a = bf16-eager-vs-fp32, b = graph-vs-fp32; pass when the graph
replay equals its eager step's tokens, b <= 2 a + 1e-3, and no greedy token differs from the bf16 model's where
the fp32 top-2 margin is large (> 4 x that row's largest bf16 logit error).

Models (``--model-kind``):
  smollm2  SmolLM2-135M-Instruct, real weights (the GGUF in --model or $MINIKV_MODEL), batch 64 x 8k
  llama8b  Llama-3.1-8B's shapes, random weights N(0, 0.02) built on the GPU, bf16 (32 layers, hidden 4096,
           32 q / 8 KV heads of dim 128, MLP 14336, vocab 128256; plain RoPE, theta 5e5: Llama-3.1's
           frequency scaling changes no cost), batch 8 x 32k
  smollm2_shape  SmolLM2-135M's shapes with random weights (no model file needed; the step's time does not
           depend on the weights' values, the presses' choices do a little), batch 64 x 8k
  tiny     a 2-layer random Llama, to check this script on a CPU in seconds
Contexts are random token ids (decode time does not depend on the text). The presses select from the
model's own prefill -- keys, values and SnapKV's window queries, captured once -- exactly what minikv.hf's
compression hooks would select, so one prefill serves every press and ratio.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import time

import torch

KINDS = {
    "smollm2": dict(batch=64, context=8192, rows_per_chunk=64, steps=32, check_rows=4),
    "llama8b": dict(batch=8, context=32768, rows_per_chunk=1, steps=16, check_rows=2),
    "smollm2_shape": dict(batch=64, context=8192, rows_per_chunk=64, steps=32, check_rows=4),
    "tiny": dict(batch=2, context=96, rows_per_chunk=2, steps=4, check_rows=2),
}
LLAMA8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                     rope_theta=100000.0)
# decoder settings a run can time beside the defaults (--step-variants): the matmuls in Triton, PDL (both in
# minikv.gpu.triton_linear), PDL for the Triton kernels only (cuBLAS matmuls), neither, and PDL with the attention
# kernel aiming at 3 programs per multiprocessor (the best of run 4's sweep on AdaKV's SmolLM2 cache)
STEP_VARIANTS = {"tlin": dict(linear="triton", pdl=False), "pdl": dict(linear="triton", pdl=True),
                 "pdlcublas": dict(linear="torch", pdl=True), "nopdl": dict(linear="torch", pdl=False),
                 "pdl_p3": dict(linear="triton", pdl=True, attn_programs_per_sm=3)}
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def add_arguments(parser) -> None:
    parser.add_argument("--model-kind", default="smollm2", choices=sorted(KINDS))
    parser.add_argument("--model", default=None, help="smollm2: .gguf file or HF folder (default: $MINIKV_MODEL)")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (smollm2), 8 (llama8b)")
    parser.add_argument("--context", type=int, default=None, help="default: 8192 (smollm2), 32768 (llama8b)")
    parser.add_argument("--ratios", default="0.5,0.75,0.875")
    parser.add_argument("--presses", default="snapkv,adakv_snapkv,critical_adakv_snapkv")
    parser.add_argument("--steps", type=int, default=None, help="decode steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--check-steps", type=int, default=6, help="tokens checked against the model's own decoding")
    parser.add_argument("--check-rows", type=int, default=None,
                        help="batch rows the float32 reference runs on (default: 4 smollm2, 2 llama8b)")
    parser.add_argument("--check-ratios", default="all", help="'all' or a list: which ratios' decoders are checked")
    parser.add_argument("--eager-steps", type=int, default=4, help="steps per repeat of the eager baselines")
    parser.add_argument("--eager-repeats", type=int, default=3)
    parser.add_argument("--eager-ratios", default="0.75", help="ratios also timed on the eager RaggedCache path")
    parser.add_argument("--rows-per-chunk", type=int, default=None, help="prefill this many rows at a time")
    parser.add_argument("--stream-variants", default="",
                        help="also time the static full cache (kernel) and the first press at ratio 0.75 with each of "
                             "these numbers of row groups / CUDA streams, e.g. 1,2,4 (rows static_triton_s<n>, compressed_s<n>)")
    parser.add_argument("--overlap-variants", default="",
                        help="also time the static full cache (kernel) and the first press at ratio 0.75 with 2 row groups "
                             "interleaved (overlap=True) and the attention kernel at each of these programs per SM, e.g. "
                             "d,1,2 (d: the kernel's default) (rows static_triton_ov<p>, compressed_ov<p>)")
    parser.add_argument("--step-variants", default="",
                        help="also time the static full cache (kernel) and every press at ratio 0.75 with these step "
                             f"settings, comma-separated, any of {sorted(STEP_VARIANTS)} (rows static_triton_<name>, "
                             "compressed_<name>)")
    parser.add_argument("--step-variant-ratios", default="0.75",
                        help="the ratios at which the presses also run the --step-variants (comma-separated)")
    parser.add_argument("--fused-variant", action="store_true",
                        help="also time the first press at ratio 0.75 with ops='fused' (row compressed_fused)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script (tiny)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no new row after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))


# -- models -------------------------------------------------------------------------------------------
def random_llama(shape: dict, device, dtype, seed: int):
    """A LlamaForCausalLM of the given shape with random weights: N(0, 0.02) matrices, norms of ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dict(dict(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                  tie_word_embeddings=False), **shape))
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()  # float32; .to(dtype) would round RoPE's frequencies to bf16
    model = model.to(dtype).eval()
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def build_model(args, device, dtype):
    from ..hf import attach

    if args.model_kind == "smollm2":
        from .. import load_model

        model, _ = load_model(args.model, device=str(device), dtype=dtype, quiet=True)
    else:
        shape = {"llama8b": LLAMA8B, "smollm2_shape": SMOLLM2_SHAPE}.get(args.model_kind, TINY)
        model = random_llama(shape, device, dtype, args.seed)
    return attach(model)


# -- measuring ----------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a device-to-device copy (2 GiB on CUDA, 64 MiB on a CPU)."""
    if device.type == "cuda":
        from .bench import copy_bandwidth as cuda_copy

        return cuda_copy(device, 40.0)[0]
    src = torch.randn(2 ** 24, device=device)
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 5 * 2 * src.numel() * src.element_size() / (time.perf_counter() - t0)


def time_steps(step, reset, steps: int, repeats: int, device) -> list[float]:
    """ms per step of each repeat; ``reset()`` before each puts the cache back where it started."""
    out = []
    for _ in range(repeats):
        reset()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            out.append(1e3 * (time.perf_counter() - t0) / steps)
    return out


def summarise(ms: list[float]) -> dict:
    med = statistics.median(ms)
    return dict(ms_per_step=med, ms_repeats=ms, spread=(max(ms) - min(ms)) / med)


# -- the model's own forward (the eager paths and the reference) ----------------------------------------
def hf_step(model, cache, ids):
    from ..hf import cache_kwarg

    out = model(input_ids=ids[:, None], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return out.logits[:, -1]


def ragged_cache(stores, seq_length: int):
    """A minikv RaggedCache whose layers are these stores (the model's forward appends to them)."""
    from ..cache import RaggedCache, RaggedLayer

    cache = RaggedCache()
    for s in stores:
        cache.layers.append(RaggedLayer(s, seq_length))
    return cache


CHECK_CRITERION = (
    "teacher-forced on the same tokens (the model's own eager bf16 greedy decoding), on a few batch rows: "
    "a = max over steps of ||eager_bf16 - fp32|| / ||fp32|| (the model's forward in bf16 vs the same forward in float32 "
    "on the same bf16 weights and kept keys/values), b = the same for the graph decoder; passed when the graph replay "
    "gives its own eager step's tokens, b <= {ratio} a + {slack}, and the graph's greedy token equals the bf16 model's "
    "wherever the fp32 top-2 margin exceeds {margin} x the largest |eager_bf16 - fp32| logit error of that row and step "
    "(a path within twice bf16's own error cannot flip such a token)")
CHECK_RATIO, CHECK_SLACK, CHECK_MARGIN = 2.0, 1e-3, 4.0


def check_rows(b: int, n: int) -> list[int]:
    """n batch rows spread over 0..b-1 (all of them when n >= b)."""
    if n >= b:
        return list(range(b))
    return sorted({round(i * (b - 1) / max(1, n - 1)) for i in range(n)})


def rows_copy(store, rows: list[int], dtype, reserve: int):
    """A new FlatStore holding these batch rows of ``store`` (each head's tokens, in order), in ``dtype``."""
    from . import layout
    from .store import FlatStore

    dev = store.starts.device
    seg = (torch.tensor(rows, device=dev)[:, None] * store.n_kv + torch.arange(store.n_kv, device=dev)).reshape(-1)
    k, v, valid = layout.to_dense(store.k_flat, store.v_flat, store.starts[seg], store._lengths[seg], store.max_len,
                                  len(rows), store.n_kv)
    out = FlatStore.from_selection(k.to(dtype), v.to(dtype), valid, reserve=reserve)
    out.use_triton = False  # the reference attends through PyTorch SDPA
    return out


@contextlib.contextmanager
def float32_weights(model):
    """Run the model's forward in float32 on its own (bf16) weights, one decoder layer upcast at a time (memory).

    Each parameter's ``.data`` is swapped for a float32 copy and swapped back afterwards -- the very same tensors,
    so the StepWeights that share them (and any captured graph) are untouched.
    """
    saved = {}

    def up(params):
        for p in params:
            saved[p] = p.data
            p.data = p.data.float()

    def down(params):
        for p in params:
            p.data = saved.pop(p)

    layers = list(model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    hooks = []
    for layer in layers:
        ps = list(layer.parameters())
        hooks.append(layer.register_forward_pre_hook(lambda m, a, ps=ps: up(ps)))
        hooks.append(layer.register_forward_hook(lambda m, a, o, ps=ps: down(ps)))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        up([p for p in model.parameters() if id(p) not in in_layers])  # embedding, final norm, lm_head
        yield model
    finally:
        for h in hooks:
            h.remove()
        down(list(saved))
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _rel(x, ref) -> float:
    return float((x - ref).norm() / ref.norm())


@torch.no_grad()
def check_decoder(model, dec, n_steps: int, n_rows: int = 4) -> dict:
    """The graph decoder against the model's own forward, bf16 and float32, teacher-forced (CHECK_CRITERION)."""
    snap = dec.snapshot()
    rows = check_rows(dec.b, n_rows)
    ref32_stores = [rows_copy(s, rows, torch.float32, n_steps + 2) for s in dec.stores]  # before anything appends
    cache = ragged_cache(dec.stores, dec.position0)
    for s in dec.stores:
        s.use_triton = False  # the reference attends through PyTorch, not through the kernel under test
    try:
        tok, inputs, ref = dec.ids.clone(), [], []
        for _ in range(n_steps):
            inputs.append(tok)
            logits = hf_step(model, cache, tok).float()
            ref.append(logits)
            tok = logits.argmax(-1)
    finally:
        for s in dec.stores:
            s.use_triton = None
    del cache
    dec.restore(snap)
    cache32 = ragged_cache(ref32_stores, dec.position0)
    idx = torch.tensor(rows, device=dec.ids.device)
    with float32_weights(model):
        f32 = [hf_step(model, cache32, inputs[t][idx]).float() for t in range(n_steps)]
    del cache32, ref32_stores

    def fed(step):
        dec.restore(snap)
        outs = []
        for t in range(n_steps):
            dec.set_ids(inputs[t])
            outs.append(step().float().clone())
        return outs

    eager = fed(dec.step_eager)
    graph = fed(dec.step) if dec.use_graph else eager
    dec.restore(snap)
    # informational, as run 1 reported it: the graph vs the bf16 model on every row
    ref_tok = [r.argmax(-1) for r in ref]
    mismatches = []
    for t in range(n_steps):
        got = graph[t].argmax(-1)
        for row in (got != ref_tok[t]).nonzero().flatten().tolist():
            r = ref[t][row]
            mismatches.append(dict(step=t, row=row, model_margin=float(r[ref_tok[t][row]] - r[got[row]])))
    rel_bf16 = max(_rel(e, r) for e, r in zip(eager, ref))
    graph_vs_eager = max(float((g - e).abs().max()) for g, e in zip(graph, eager))
    graph_tokens_equal = all(bool(torch.equal(g.argmax(-1), e.argmax(-1))) for g, e in zip(graph, eager))
    # the criterion: errors against float32 on the checked rows
    a = max(_rel(ref[t][idx], f32[t]) for t in range(n_steps))
    b_err = max(_rel(graph[t][idx], f32[t]) for t in range(n_steps))
    decided, flips = 0, []
    for t in range(n_steps):
        top2 = f32[t].topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        e_row = (ref[t][idx] - f32[t]).abs().amax(-1)
        g_tok, m_tok = graph[t][idx].argmax(-1), ref[t][idx].argmax(-1)
        for i, row in enumerate(rows):
            if float(margin[i]) > CHECK_MARGIN * float(e_row[i]):
                decided += 1
                if int(g_tok[i]) != int(m_tok[i]):
                    flips.append(dict(step=t, row=row, fp32_margin=float(margin[i]), bf16_err=float(e_row[i])))
    err_ok = b_err <= CHECK_RATIO * a + CHECK_SLACK
    ok = graph_tokens_equal and err_ok and not flips
    return dict(steps=n_steps, rows=dec.b, checked_rows=rows,
                criterion=CHECK_CRITERION.format(ratio=CHECK_RATIO, slack=CHECK_SLACK, margin=CHECK_MARGIN),
                rel_err_eager_bf16_vs_fp32=a, rel_err_graph_vs_fp32=b_err, err_ok=err_ok,
                tokens_decided=decided, tokens_checked=n_steps * len(rows), decided_token_flips=flips[:20],
                graph_vs_eager_max_abs=graph_vs_eager, graph_tokens_equal_eager=graph_tokens_equal,
                logits_rel_err_vs_model=rel_bf16, greedy_tokens_equal_model=not mismatches, mismatches=mismatches[:20],
                n_mismatches=len(mismatches), passed=ok)


# -- the rows -----------------------------------------------------------------------------------------
def decoder_row(model, weights, stores, prefilled, first, attention, args, device, copy_bw, check: bool,
                ops: str = "auto", streams: int = 1, overlap: bool = False, attn_programs_per_sm=None,
                linear: str = "auto", pdl: bool | None = None):
    from .decoder import StaticDecoder

    t0 = time.perf_counter()
    dec = StaticDecoder(weights, stores, prefilled.context_length, first, attention=attention, ops=ops, streams=streams,
                        overlap=overlap, attn_programs_per_sm=attn_programs_per_sm, linear=linear, pdl=pdl)
    snap = dec.snapshot()
    graph_error = None
    if dec.use_graph:
        try:
            dec.capture()
        except Exception as e:  # keep going without the graph: the same step, eager (the row says so)
            import traceback

            traceback.print_exc()
            dec.graph, dec.use_graph = None, False
            dec.restore(snap)
            graph_error = f"{type(e).__name__}: {e}"[:300]
    row = dict(attention=dec.attention, ops=dec.ops, graph=dec.use_graph, streams=dec.n_streams, overlap=dec.overlap,
               attn_programs=dec.attn_programs, linear=dec.linear, pdl=dec.pdl)
    if graph_error:
        row["graph_error"] = graph_error
    if check and args.check_steps > 0:
        try:
            row["check"] = check_decoder(model, dec, args.check_steps, args.check_rows)
        except Exception as e:  # a failed check fails the row's check, not its timing
            import traceback

            traceback.print_exc()
            row["check"] = dict(passed=False, error=f"{type(e).__name__}: {e}"[:300], logits_rel_err_vs_model=float("nan"),
                                rel_err_eager_bf16_vs_fp32=float("nan"), rel_err_graph_vs_fp32=float("nan"),
                                graph_vs_eager_max_abs=float("nan"), n_mismatches=-1, steps=0, rows=dec.b)
            dec.restore(snap)
    sync(device)
    row["setup_s"] = time.perf_counter() - t0
    kv = dec.kv_bytes()
    captures = dec.captures
    ms = time_steps(dec.step, lambda: dec.restore(snap), args.steps, args.repeats, device)
    row["captures_during_timing"] = dec.captures - captures  # 0 unless a store ran out of room (a re-layout)
    per_token = sum(2 * s.b * s.n_kv * s.k_flat.shape[1] * s.k_flat.element_size() for s in stores)  # one more token, all heads
    kv_read = kv + per_token * (args.steps + 1) / 2  # held at the start + the tokens appended, on average over a repeat
    dec.restore(snap)
    dec = None  # free the stores' graph (not del: the timing closures above name it)
    return finish_row(row, ms, kv, kv_read, weights.bytes_read(first.shape[0]), first.shape[0], copy_bw)


def finish_row(row, ms, kv, kv_read, weight_bytes, batch, copy_bw):
    row.update(summarise(ms))
    floor_ms = 1e3 * (weight_bytes + kv_read) / copy_bw
    row.update(kv_bytes=kv, kv_bytes_read=kv_read, weight_bytes=weight_bytes, floor_ms=floor_ms,
               x_floor=row["ms_per_step"] / floor_ms, tokens_per_s=batch * 1e3 / row["ms_per_step"])
    return row


@torch.no_grad()
def dynamic_row(model, weights, prefilled, first, args, device, copy_bw):
    """transformers' DynamicCache (a copy of the prefilled cache), decoded by the model's forward, eager."""
    from transformers.cache_utils import DynamicCache

    L = prefilled.context_length
    cache = DynamicCache()
    for i, s in enumerate(prefilled.stores):
        kd, vd = s.dense_view()
        cache.update(kd[:, :, :L], vd[:, :, :L], i)  # copies
    kv = sum(2 * s.b * s.n_kv * L * s.k_flat.shape[1] * s.k_flat.element_size() for s in prefilled.stores)
    state = dict(tok=first.clone())

    def step():
        state["tok"] = hf_step(model, cache, state["tok"]).argmax(-1)

    step()  # warm-up
    ms = time_steps(step, lambda: None, args.eager_steps, args.eager_repeats, device)  # (the cache grows a little)
    cache = None  # (not del: step() above names it)
    row = dict(attention="sdpa (transformers)", ops="eager", graph=False)
    return finish_row(row, ms, kv, kv, weights.bytes_read(first.shape[0]), first.shape[0], copy_bw)


@torch.no_grad()
def ragged_eager_row(model, weights, stores, prefilled, first, args, device, copy_bw):
    """The model's forward on a RaggedCache (FlatStores + the kernel), eager: the path before CUDA graphs."""
    L = prefilled.context_length
    snaps = [s.snapshot() for s in stores]
    holder = {}

    def reset():
        for s, sn in zip(stores, snaps):
            s.restore(sn)
        holder.update(cache=ragged_cache(stores, L), tok=first.clone())

    def step():
        holder["tok"] = hf_step(model, holder["cache"], holder["tok"]).argmax(-1)

    reset()
    step()  # warm-up
    kv = sum(s.nbytes for s in stores)
    ms = time_steps(step, reset, args.eager_steps, args.eager_repeats, device)
    reset()
    row = dict(attention="triton (minikv.hf)", ops="eager", graph=False)
    return finish_row(row, ms, kv, kv, weights.bytes_read(first.shape[0]), first.shape[0], copy_bw)


# -- the run ------------------------------------------------------------------------------------------
def speedups(rows):
    """Add tokens/s ratios of every row over each full-cache baseline present.

    A baseline timed in several variants (``static_sdpa`` and ``static_sdpa_nopdl``, ...) counts with its fastest:
    ``x_vs["static_sdpa"]`` is over the fastest static SDPA row, ``x_vs_best_static`` over the fastest static row.
    """
    base = {}
    for r in rows:
        if r["method"].startswith(("dynamic", "static")) and "tokens_per_s" in r:
            kind = next((k for k in ("static_sdpa", "static_triton") if r["method"].startswith(k)), r["method"])
            base[kind] = max(base.get(kind, 0.0), r["tokens_per_s"])
    best_static = max([v for k, v in base.items() if k.startswith("static")], default=None)
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        r["x_vs"] = {k: r["tokens_per_s"] / v for k, v in base.items()}
        if best_static:
            r["x_vs_best_static"] = r["tokens_per_s"] / best_static


def targets(rows, kind):
    """The issue's targets, evaluated on this run (ratio 0.75 compressed rows)."""
    need = {"smollm2": 3.0, "smollm2_shape": 3.0, "llama8b": 1.7}.get(kind)
    out = []
    best = {}  # per press at ratio 0.75: the fastest graph decoder with the default settings or another stream count
    for r in rows:
        if (r["method"] == "compressed" or re.fullmatch(r"compressed_(s\d+|" + "|".join(STEP_VARIANTS) + ")", r["method"])) \
                and r.get("ratio") == 0.75 \
                and "ms_per_step" in r and (r["press"] not in best or r["ms_per_step"] < best[r["press"]]["ms_per_step"]):
            best[r["press"]] = r
    for r in best.values():
        src = dict(row=r["method"], streams=r.get("streams", 1), pdl=r.get("pdl", False), linear=r.get("linear", "torch"))
        out.append(dict(what=f"{r['press']} r0.75: step <= 2x floor", value=r["x_floor"], met=r["x_floor"] <= 2.0, **src))
        if need and "x_vs_best_static" in r:
            out.append(dict(what=f"{r['press']} r0.75: tokens/s >= {need}x best static full cache",
                            value=r["x_vs_best_static"], met=r["x_vs_best_static"] >= need, **src))
        if need and "static_sdpa" in r.get("x_vs", {}):
            out.append(dict(what=f"{r['press']} r0.75: tokens/s >= {need}x static SDPA full cache",
                            value=r["x_vs"]["static_sdpa"], met=r["x_vs"]["static_sdpa"] >= need, **src))
    graph_rows = [r for r in rows if r.get("graph") and "spread" in r]
    if graph_rows:
        worst = max(r["spread"] for r in graph_rows)
        out.append(dict(what="repeat spread <= 5% (all graph rows)", value=worst, met=worst <= 0.05))
    checks = [r["check"]["passed"] for r in rows if "check" in r]
    if checks:
        out.append(dict(what="graph decoders pass the fp32 check (fraction of decoders)", value=sum(checks) / len(checks),
                        met=all(checks)))
    return out


def parse_step_variants(step_variants: str) -> list:
    """'pdl,tlin' -> [('pdl', decoder kwargs), ...]; a clear error for a name not in STEP_VARIANTS."""
    out = []
    for name in (x.strip() for x in step_variants.split(",") if x.strip()):
        if name not in STEP_VARIANTS:
            raise ValueError(f"--step-variants must be comma-separated names from {sorted(STEP_VARIANTS)}, "
                             f"got {name!r} in {step_variants!r}")
        out.append((name, STEP_VARIANTS[name]))
    return out


def parse_variants(stream_variants: str, overlap_variants: str):
    """'1,2' and 'd,1,2' -> ([1, 2], [(p, decoder kwargs), ...]); a clear error for anything else."""
    streams, overlaps = [], []
    for n in (x.strip() for x in stream_variants.split(",") if x.strip()):
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"--stream-variants must be comma-separated positive ints (e.g. 1,2,4), got {stream_variants!r}")
        streams.append(int(n))
    for p in (x.strip() for x in overlap_variants.split(",") if x.strip()):
        if p != "d" and (not p.isdigit() or int(p) < 1):
            raise ValueError(f"--overlap-variants must be comma-separated 'd' or positive ints (programs per SM), "
                             f"got {overlap_variants!r}")
        overlaps.append((p, dict(streams=2, overlap=True, attn_programs_per_sm=None if p == "d" else int(p))))
    return streams, overlaps


def run(args) -> int:
    from ..registry import get_press
    from .decoder import StepWeights, compressed_stores, prefill_to_stores

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("minikv.gpu.e2e: no CUDA device; use --device cpu --model-kind tiny to check the script")
        return 1
    dflt = KINDS[args.model_kind]
    for k in ("batch", "context", "steps", "rows_per_chunk", "check_rows"):
        if getattr(args, k) is None:
            setattr(args, k, dflt[k])
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"e2e_{args.model_kind}.json")
    log_lines: list[str] = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    copy_bw = copy_bandwidth(device)
    model = build_model(args, device, dtype)
    weights = StepWeights(model)
    ratios = [float(r) for r in args.ratios.split(",") if r]
    check_ratios = ratios if args.check_ratios == "all" else [float(r) for r in args.check_ratios.split(",") if r]
    eager_ratios = [float(r) for r in args.eager_ratios.split(",") if r]
    presses = [p for p in args.presses.split(",") if p]
    n_queries = max([get_press(p, compression_ratio=0.5).needs_queries for p in presses], default=0)
    reserve = -(-max(64, args.steps + args.check_steps + 8) // 16) * 16  # free slots per head: never re-laid out here
    cfg = model.config
    meta = dict(model_kind=args.model_kind, model=str(args.model or os.environ.get("MINIKV_MODEL", "")) if args.model_kind == "smollm2" else "random",
                layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                kv_heads=cfg.num_key_value_heads, head_dim=weights.layers[0].d, vocab=weights.vocab,
                weight_bytes=weights.bytes_read(args.batch), batch=args.batch, context=args.context, steps=args.steps,
                repeats=args.repeats, check_steps=args.check_steps, reserve=reserve, copy_bw=copy_bw, dtype=str(dtype),
                device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m minikv.gpu.e2e " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                               if k not in ("command", "func")),
                presses_note="presses select from the model's own prefill (keys, values, last-64 window queries)",
                check_rows=args.check_rows,
                check_criterion=CHECK_CRITERION.format(ratio=CHECK_RATIO, slack=CHECK_SLACK, margin=CHECK_MARGIN))
    import transformers

    meta["transformers"] = transformers.__version__
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if device.type == "cuda":
        meta["fused_merge"] = __import__("minikv.gpu.triton_decode", fromlist=["x"]).fused_merge_default()
    rows: list[dict] = []

    def save():
        speedups(rows)
        out = dict(meta=meta, rows=rows, targets=targets(rows, args.model_kind), log=log_lines)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        return out

    def add(fn, **label):
        if time.time() - t_start > args.budget_s:
            log(f"  budget reached: skipping {label}")
            rows.append(dict(**label, skipped="budget"))
            return
        t1 = time.time()
        try:
            r = fn()
        except Exception as e:  # one failing row must not lose the others
            import traceback

            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {e}"[:500])
        r = dict(**label, batch=args.batch, context=args.context, **r, row_s=time.time() - t1)
        rows.append(r)
        if "ms_per_step" in r:
            chk = r.get("check")
            chk_s = "" if not chk else (f" | check {'ok' if chk['passed'] else 'FAILED'}: vs fp32 bf16-eager "
                                        f"{chk.get('rel_err_eager_bf16_vs_fp32', float('nan')):.1e} graph "
                                        f"{chk.get('rel_err_graph_vs_fp32', float('nan')):.1e}, decided-token flips "
                                        f"{len(chk.get('decided_token_flips', []))}/{chk.get('tokens_decided', 0)}, "
                                        f"graph-eager {chk['graph_vs_eager_max_abs']:.1e}")
            log(f"{r['method']:16} {r.get('press', '-'):22} {r.get('ratio', 0):5.3f}{'' if r.get('graph', True) or r['method'].endswith('eager') else ' [NO GRAPH]'}  {r['ms_per_step']:8.3f} ms/step "
                f"(spread {100 * r['spread']:4.1f}%)  {r['tokens_per_s']:9.0f} tok/s  KV {r['kv_bytes'] / 1e9:6.3f} GB  "
                f"floor {r['floor_ms']:7.3f} ms  x{r['x_floor']:5.2f}{chk_s}  ({r['row_s']:.0f} s)")
        else:
            log(f"{label}: {r.get('error')}")
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    log(f"{meta['device']}: copy {copy_bw / 1e12:.2f} TB/s; {args.model_kind} b={args.batch} L={args.context}, "
        f"weights read per step {meta['weight_bytes'] / 1e9:.3f} GB")
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    ids = torch.randint(100, cfg.vocab_size - 100, (args.batch, args.context), device=device, generator=gen)
    pre = prefill_to_stores(model, ids, reserve=reserve, n_queries=n_queries, rows_per_chunk=args.rows_per_chunk)
    first = pre.logits.argmax(-1)
    sync(device)
    meta["prefill_s"] = time.time() - t0
    log(f"prefill {meta['prefill_s']:.1f} s")

    add(lambda: dynamic_row(model, weights, pre, first, args, device, copy_bw), method="dynamic_eager", press="no_press", ratio=0.0)
    kernel = "triton" if device.type == "cuda" else "torch"
    for method, attention in (("static_sdpa", "sdpa"), ("static_triton", kernel)):
        add(lambda: decoder_row(model, weights, pre.stores, pre, first, attention, args, device, copy_bw, check=True),
            method=method, press="no_press", ratio=0.0)
    stream_variants, overlap_variants = parse_variants(args.stream_variants, args.overlap_variants)
    for n in stream_variants:  # the strongest baseline we have, with every number of streams tried
        add(lambda n=n: decoder_row(model, weights, pre.stores, pre, first, kernel, args, device, copy_bw, check=False,
                                    streams=n), method=f"static_triton_s{n}", press="no_press", ratio=0.0)
    step_variants = parse_step_variants(args.step_variants)
    step_ratios = [float(r) for r in args.step_variant_ratios.split(",") if r.strip()]
    for name, kw in step_variants:
        for method, attention in (("static_sdpa", "sdpa"), ("static_triton", kernel)):
            add(lambda kw=kw, attention=attention: decoder_row(model, weights, pre.stores, pre, first, attention, args, device,
                                                               copy_bw, check=False, **kw),
                method=f"{method}_{name}", press="no_press", ratio=0.0)
    for p, kw in overlap_variants:
        add(lambda kw=kw: decoder_row(model, weights, pre.stores, pre, first, kernel, args, device, copy_bw, check=False,
                                      **kw), method=f"static_triton_ov{p}", press="no_press", ratio=0.0)
    for ratio in ratios:
        for name in presses:
            holder = {}

            def compressed(name=name, ratio=ratio):
                t1 = time.time()
                holder["stores"] = compressed_stores(pre, get_press(name, compression_ratio=ratio), model, reserve)
                sync(device)
                select_s = time.time() - t1
                r = decoder_row(model, weights, holder["stores"], pre, first, "auto", args, device, copy_bw,
                                check=ratio in check_ratios)
                held = sum(s.nbytes for s in holder["stores"])
                full = sum(s.nbytes for s in pre.stores)
                return dict(r, select_build_s=select_s, kv_fraction=held / full)

            add(compressed, method="compressed", press=name, ratio=ratio)
            first_press = ratio == 0.75 and name == presses[0]
            # (method, decoder settings, checked?): the step variants, then (first press at 0.75) the stream, overlap
            # and fused variants -- all on the same compressed stores
            extra = [(f"compressed_{v}", kw, ratio in check_ratios) for v, kw in step_variants] if ratio in step_ratios else []
            if first_press:
                extra += [(f"compressed_s{n}", dict(streams=n), False) for n in stream_variants]
                extra += [(f"compressed_ov{p}", kw, False) for p, kw in overlap_variants]
                if args.fused_variant:
                    extra.append(("compressed_fused", dict(ops="fused"), False))
            if (extra or first_press) and "stores" not in holder:  # (the compressed row was skipped or failed)
                holder["stores"] = compressed_stores(pre, get_press(name, compression_ratio=ratio), model, reserve)
            for method, kw, check in extra:
                add(lambda kw=kw, check=check: decoder_row(model, weights, holder["stores"], pre, first, "auto", args,
                                                           device, copy_bw, check=check, **kw),
                    method=method, press=name, ratio=ratio)
            if ratio in eager_ratios and "stores" in holder:
                add(lambda: ragged_eager_row(model, weights, holder["stores"], pre, first, args, device, copy_bw),
                    method="compressed_eager", press=name, ratio=ratio)
            holder.clear()
    out = save()
    print(f"\nwrote {path}  ({time.time() - t_start:.0f} s)\n")
    print(table(out))
    return 0 if all(t["met"] for t in out["targets"] if "fp32 check" in t["what"]) else 2


def table(out) -> str:
    """The run as a text table, with the targets under it."""
    lines = [f"{'method':16} {'press':22} {'ratio':>5} {'ms/step':>8} {'spread':>6} {'tok/s':>9} {'KV GB':>7} "
             f"{'floor ms':>8} {'x floor':>7} {'x static':>8} {'x dyn':>6} check"]
    for r in out["rows"]:
        if "ms_per_step" not in r:
            lines.append(f"{r['method']:16} {r.get('press', '-'):22} {r.get('ratio', 0):5.3f} "
                         f"{r.get('error') or r.get('skipped')}")
            continue
        x = r.get("x_vs", {})
        chk = r.get("check")
        lines.append(f"{r['method']:16} {r.get('press', '-'):22} {r.get('ratio', 0):5.3f} {r['ms_per_step']:8.3f} "
                     f"{100 * r['spread']:5.1f}% {r['tokens_per_s']:9.0f} {r['kv_bytes'] / 1e9:7.3f} {r['floor_ms']:8.3f} "
                     f"{r['x_floor']:7.2f} {r.get('x_vs_best_static', float('nan')):8.2f} "
                     f"{x.get('dynamic_eager', float('nan')):6.2f} "
                     f"{'-' if not chk else ('ok' if chk['passed'] else 'FAILED')}")
    lines.append("")
    for t in out["targets"]:
        lines.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['what']}: {t['value']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
