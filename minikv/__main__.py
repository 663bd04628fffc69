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

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args.out, args.compression_ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
