"""Where a decode step's time goes, and the launch settings that cut it (one H200 run).

    python -m minikv.gpu.tune --out results/gpu/decode_graphs_run3

Three parts, GPU time from CUDA graphs (``triton.testing.do_bench_cudagraph``, median):

1. ``ops``: every op of one SmolLM2 layer at batch 64 (random bf16 weights of the real shapes), one by
   one: the 9-launch step (``ops="triton"``) and the fused kernels of ``minikv.gpu.triton_fused``
   (``ops="fused"``) over a small grid of tile sizes; and the same two matmuls at the Llama-3.1-8B shape
   (batch 8) to see whether fusing pays at either size.
2. ``linear`` (run 6 on): the step's matmuls alone, cuBLAS (``F.linear``) against ``minikv.gpu.triton_linear`` over a
   grid of tiles, for SmolLM2 (batch 64) and the Llama-3.1-8B shape (batch 8).
3. ``attention``: the attention kernel's split plan on small caches (ratio 0.75, AdaKV-shaped heads
   as in ``minikv bench``) and on one layer of the end-to-end SmolLM2 cache: how many programs to aim
   for (``programs``, incl. one chunk per segment), fused or two-launch merge, tile length and stages,
   against full-cache SDPA on the same inputs.

Writes ``tune_h200.json`` (every timing) and prints the best settings per case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
import torch.nn.functional as F

from .bench import MODELS, adakv_selection, sdpa_decode, timed_graph


def _graph_us(fn, rep_ms):
    return 1e3 * timed_graph(fn, rep_ms)


def ops_part(device, rep_ms, log, shapes=("smollm2", "llama8b")):
    from . import triton_fused as tf
    from . import triton_step as ts
    from .store import FlatStore

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    for shape, M, K, H, n_kv, d, inter, L in (("smollm2", 64, 576, 9, 3, 64, 1536, 2048),
                                              ("llama8b", 8, 4096, 32, 8, 128, 14336, 64)):
        if shape not in shapes:
            continue
        x = torch.randn(M, K, generator=gen, **bf)
        r = torch.randn(M, K, generator=gen, **bf)
        ln = torch.rand(K, generator=gen, **bf) + 0.5
        w_qkv = torch.randn((H + 2 * n_kv) * d, K, generator=gen, **bf) * K ** -0.5
        w_o = torch.randn(K, H * d, generator=gen, **bf) * K ** -0.5
        w_gu = torch.randn(2 * inter, K, generator=gen, **bf) * K ** -0.5
        w_down = torch.randn(K, inter, generator=gen, **bf) * inter ** -0.5
        pos = torch.full((M,), L, device=device, dtype=torch.long)
        cos, sin = (torch.randn(L + 8, d, generator=gen, **bf) for _ in range(2))
        keys = torch.randn(M, n_kv, L, d, generator=gen, **bf)
        st = FlatStore.uniform(keys, keys, reserve=8)
        del keys
        lengths0 = st._lengths.clone()
        qkv = F.linear(x, w_qkv)
        gu = F.linear(x, w_gu)
        a = torch.randn(M, H * d, generator=gen, **bf)
        act = torch.randn(M, inter, generator=gen, **bf)
        dummy = torch.zeros(M * n_kv, dtype=torch.long, device=device)

        def add(op, fn, **cfg):
            try:
                us = _graph_us(fn, rep_ms)
            except Exception as e:  # a tile that does not compile (shared memory) is a row with an error
                rows.append(dict(shape=shape, op=op, error=f"{type(e).__name__}: {e}"[:200], **cfg))
                return None
            rows.append(dict(shape=shape, op=op, us=us, **cfg))
            return us

        reset = add("lengths reset (subtracted from rope_append)", lambda: st._lengths.copy_(lengths0))
        base = {
            "add_rmsnorm": add("add_rmsnorm", lambda: ts.add_rmsnorm(x, r, ln, 1e-5)),
            "linear qkv": add("linear qkv", lambda: F.linear(x, w_qkv)),
            "rope_append": add("rope_append + reset", lambda: (ts.rope_append(qkv, pos, cos, sin, st.k_flat, st.v_flat, st.starts,
                                                                              st._lengths, H, n_kv, d), st._lengths.copy_(lengths0))),
            "linear o": add("linear o", lambda: F.linear(a, w_o)),
            "linear gate/up": add("linear gate/up", lambda: F.linear(x, w_gu)),
            "silu_mul": add("silu_mul", lambda: ts.silu_mul(gu)),
            "linear down": add("linear down", lambda: F.linear(act, w_down)),
        }
        if base["rope_append"] is not None and reset is not None:
            base["rope_append"] -= reset
        nine = sum(v for v in base.values() if v is not None) + base["add_rmsnorm"]  # two norms per layer
        log(f"[ops] {shape}: the 8 launches of ops='triton' besides attention: {nine:.1f} us per layer; "
            + ", ".join(f"{k} {v:.1f}" for k, v in base.items() if v is not None))
        best_q, best_g = None, None
        grid_q = [dict(block_m=bm, block_k=bk, num_warps=nw) for bm in (16, 32, 64) for bk in (64, 128) for nw in (4,)]
        grid_g = [dict(block_m=bm, block_n=bn, block_k=64, num_stages=ns) for bm in (16, 32, 64) for bn in (32, 64)
                  for ns in (2, 3)]
        if shape == "llama8b":  # only the defaults: is fusing worth it at all at this size?
            grid_q, grid_g = [dict()], [dict()]
        for cfg in grid_q:
            us = add("norm_qkv_rope", lambda cfg=cfg: tf.norm_qkv_rope(x, r, ln, 1e-5, w_qkv, None, pos, cos, sin, st.k_flat,
                                                                       st.v_flat, st.starts, st._lengths, H, n_kv, d, **cfg), **cfg)
            if us is not None and (best_q is None or us < best_q[0]):
                best_q = (us, cfg)
        for cfg in grid_g:
            us = add("norm_gate_up", lambda cfg=cfg: tf.norm_gate_up(x, r, ln, 1e-5, w_gu, None, bump=dummy, **cfg), **cfg)
            if us is not None and (best_g is None or us < best_g[0]):
                best_g = (us, cfg)
        fused = best_q[0] + best_g[0] + base["linear o"] + base["linear down"]
        log(f"[ops] {shape}: ops='fused' (attention apart): {fused:.1f} us per layer; norm_qkv_rope {best_q[0]:.1f} "
            f"{best_q[1]}, norm_gate_up {best_g[0]:.1f} {best_g[1]}")
        rows.append(dict(shape=shape, op="summary", nine_launch_us=nine, fused_us=fused, best_qkv=best_q[1],
                         best_gate_up=best_g[1], best_qkv_us=best_q[0], best_gate_up_us=best_g[0]))
        st = None  # free the cache before the next shape
        torch.cuda.empty_cache()
    return rows


LINEAR_SHAPES = [("smollm2", "qkv", 64, 576, 960), ("smollm2", "o", 64, 576, 576), ("smollm2", "gate/up", 64, 576, 3072),
                 ("smollm2", "down", 64, 1536, 576), ("llama8b", "qkv", 8, 4096, 6144), ("llama8b", "o", 8, 4096, 4096),
                 ("llama8b", "gate/up", 8, 4096, 28672), ("llama8b", "down", 8, 14336, 4096)]


def linear_part(device, rep_ms, log, copy_bw=4.25e12):
    """The step's matmuls: cuBLAS (F.linear) against minikv.gpu.triton_linear over a grid of tiles (no PDL: alone,
    a kernel has nothing to overlap with; the end-to-end run measures PDL)."""
    from .triton_linear import linear

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for model, name, M, K, N in LINEAR_SHAPES:
        x = torch.randn(M, K, generator=gen, device=device, dtype=torch.bfloat16)
        w = torch.randn(N, K, generator=gen, device=device, dtype=torch.bfloat16) * K ** -0.5
        floor_us = 1e6 * w.numel() * 2 / copy_bw
        cublas = _graph_us(lambda: F.linear(x, w), rep_ms)
        rows.append(dict(model=model, op=name, M=M, K=K, N=N, impl="cublas", us=cublas, floor_us=floor_us))
        best = None
        for bn in (16, 32, 64):
            for bk in (64, 128, 256):
                for ns in (2, 3, 4):
                    cfg = dict(block_n=bn, block_k=bk, num_warps=4, num_stages=ns)
                    try:
                        us = _graph_us(lambda cfg=cfg: linear(x, w, **cfg), rep_ms)
                    except Exception as e:  # a tile that does not fit (shared memory)
                        rows.append(dict(model=model, op=name, M=M, K=K, N=N, impl="triton", error=f"{type(e).__name__}: {e}"[:200], **cfg))
                        continue
                    rows.append(dict(model=model, op=name, M=M, K=K, N=N, impl="triton", us=us, floor_us=floor_us, **cfg))
                    if best is None or us < best[0]:
                        best = (us, cfg)
        default = _graph_us(lambda: linear(x, w), rep_ms)
        rows.append(dict(model=model, op=name, M=M, K=K, N=N, impl="triton", config="default", us=default, floor_us=floor_us))
        log(f"[linear] {model} {name} ({M}x{K} @ {K}x{N}): bytes {floor_us:.1f} us; cuBLAS {cublas:.1f} us; "
            f"triton default {default:.1f} us; best {best[0]:.1f} us {best[1]}")
    return rows


SMALL_CASES = [("smollm2", 4096, 1, "adakv"), ("smollm2", 4096, 8, "adakv"), ("smollm2", 4096, 32, "adakv"),
               ("llama8b", 4096, 1, "adakv"), ("llama8b", 4096, 8, "adakv"), ("llama8b", 4096, 32, "adakv"),
               ("llama8b", 16384, 8, "adakv"), ("smollm2", 8192, 64, "adakv")]
E2E_CASES = [("smollm2", 8192, 64, "adakv"), ("smollm2", 8192, 64, "uniform")]  # one layer of the e2e SmolLM2 cache


def _grid(kind, sm):
    if kind == "small":  # the issue-13 sweep
        return [dict(fused=f, block_n=bn, num_stages=st, programs=p) for f in (True, False) for bn in (64, 128)
                for st in (2, 3) for p in (1, sm, 2 * sm, 4 * sm, 8 * sm, 16 * sm)]
    return [dict(fused=False, block_n=bn, num_stages=st, num_warps=nw, programs=int(k * sm)) for bn in (64, 128)
            for st in (2, 3, 4) for nw in (4, 8) for k in (1, 1.5, 2, 3, 4, 5, 6, 8)]


def attention_part(device, rep_ms, log, sm, cases=SMALL_CASES, grid="small", copy_bw=4.25e12):
    from .store import FlatStore
    from .triton_decode import flat_decode_attention

    rows = []
    for model, L, b, heads in cases:
        m = MODELS[model]
        H, n_kv, d = m["H"], m["n_kv"], m["d"]
        gen = torch.Generator(device=device).manual_seed(L + b)
        keys = torch.randn(b, n_kv, L, d, generator=gen, device=device, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        query = torch.randn(b, H, 1, d, generator=gen, device=device, dtype=torch.bfloat16)
        full_us = _graph_us(lambda: sdpa_decode(query, keys, values), rep_ms)
        if heads == "uniform":  # every head keeps the same number of tokens (SnapKV's cache)
            keep = torch.zeros(b, n_kv, L, dtype=torch.bool, device=device)
            keep[..., L - L // 4:] = True
        else:
            keep, _, _ = adakv_selection(b, n_kv, L, 0.75, gen, device)
        store = FlatStore.from_selection(keys, values, keep, reserve=64)
        keys = values = None  # only the compressed store is timed
        n_cap, max_cap = store.capacity_bounds()
        S = store.starts.numel()
        best = None
        for cfg in _grid(grid, sm):
            fn = lambda cfg=cfg: flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store._lengths,
                                                       d ** -0.5, n_cap, max_cap, **cfg)
            try:
                us = _graph_us(fn, rep_ms)
            except Exception as e:  # a tiling that does not fit (shared memory) is a row with its error
                rows.append(dict(model=model, L=L, b=b, heads=heads, S=S, error=f"{type(e).__name__}: {e}"[:200], **cfg))
                continue
            rows.append(dict(model=model, L=L, b=b, heads=heads, S=S, us=us, full_us=full_us, ratio_to_full=us / full_us,
                             kv_bytes=store.nbytes, **cfg))
            if best is None or us < best[0]:
                best = (us, cfg)
        default_us = _graph_us(lambda: flat_decode_attention(query, store.k_flat, store.v_flat, store.starts, store._lengths,
                                                             d ** -0.5, n_cap, max_cap), rep_ms)
        rows.append(dict(model=model, L=L, b=b, heads=heads, S=S, us=default_us, full_us=full_us,
                         ratio_to_full=default_us / full_us, kv_bytes=store.nbytes, config="default"))
        log(f"[attn] {model} L={L} b={b} {heads}: floor {1e6 * store.nbytes / copy_bw:.1f} us; full SDPA {full_us:.1f} us; "
            f"default {default_us:.1f} us "
            f"({default_us / full_us:.3f}x); best {best[0]:.1f} us ({best[0] / full_us:.3f}x) {best[1]}")
        store = query = None
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--parts", default="ops,attention", help="any of ops, linear, attention, attention-e2e (comma-separated)")
    p.add_argument("--ops-shapes", default="smollm2,llama8b")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("minikv.gpu.tune needs a CUDA device")
        return 1
    device = torch.device("cuda")
    os.makedirs(args.out, exist_ok=True)
    log_lines = []

    def log(s):
        print(s, flush=True)
        log_lines.append(s)

    import triton

    sm = torch.cuda.get_device_properties(0).multi_processor_count
    out = dict(meta=dict(device=torch.cuda.get_device_name(), sms=sm, torch=torch.__version__, triton=triton.__version__,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         rep_ms=args.rep_ms, command="python -m minikv.gpu.tune " + " ".join(argv or [])), log=log_lines)
    t0 = time.time()
    parts = args.parts.split(",")
    path = os.path.join(args.out, "tune_h200.json")
    if "ops" in parts:
        out["ops"] = ops_part(device, args.rep_ms, log, args.ops_shapes.split(","))
        json.dump(out, open(path, "w"), indent=1)
    if "linear" in parts:
        out["linear"] = linear_part(device, args.rep_ms, log)
        json.dump(out, open(path, "w"), indent=1)
    if "attention" in parts or "attention-e2e" in parts:
        from .bench import copy_bandwidth

        bw, _ = copy_bandwidth(device, args.rep_ms)
        out["meta"]["copy_bw"] = bw
        if "attention" in parts:
            out["attention"] = attention_part(device, args.rep_ms, log, sm, copy_bw=bw)
        if "attention-e2e" in parts:
            out["attention_e2e"] = attention_part(device, args.rep_ms, log, sm, E2E_CASES, "e2e", copy_bw=bw)
    out["meta"]["seconds"] = time.time() - t0
    json.dump(out, open(path, "w"), indent=1)
    log(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
