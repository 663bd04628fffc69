"""Write the tables of results/eval_heldout/README.md from its paired.csv and summary.csv.

    python scripts/results_tables.py            # rewrite the block between the table markers
    python scripts/results_tables.py --check    # exit 1 if the README's tables differ from the CSVs
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minikv.evaluate import read_csv, read_paired_csv  # noqa: E402

FOLDER = ROOT / "results" / "eval_heldout"
START, END = "<!-- tables:start (scripts/results_tables.py) -->", "<!-- tables:end -->"
PAIRS = [("adakv_snapkv", "snapkv"), ("critical_snapkv", "snapkv"), ("critical_adakv_snapkv", "adakv_snapkv"),
         ("critical_adakv_snapkv", "snapkv"), ("snapkv", "streaming_llm"), ("snapkv", "knorm")]
ABLATIONS = [("snapkv+window_size=8", "snapkv"), ("snapkv+window_size=16", "snapkv"), ("snapkv+window_size=32", "snapkv"),
             ("snapkv+pooling=max+kernel_size=7", "snapkv"), ("adakv_snapkv+alpha_safeguard=0.05", "adakv_snapkv"),
             ("adakv_snapkv+window_size=16", "adakv_snapkv")]
SECTIONS = [("heldout:1024", "fut_err", "Held-out attention-output error (continuation queries), 1k context", PAIRS),
            ("heldout:1024", "win_err", "In-sample attention-output error (the window queries that chose the tokens), 1k context", PAIRS),
            ("heldout:4096", "fut_err", "Held-out attention-output error, 4k context", PAIRS[:4]),
            ("longppl:1024", "kl", "Continuation KL(full || press), all tokens", PAIRS),
            ("longppl:1024", "kl_long", "Continuation KL on long-dependent tokens", PAIRS),
            ("qa0:1024", "em", "Question-agnostic QA, exact match", PAIRS),
            ("qa0:1024", "logp", "Question-agnostic QA, log-prob of the gold answer", PAIRS),
            ("heldout:1024", "fut_err", "Ablations: held-out attention-output error, 1k context", ABLATIONS)]


def cell(r) -> str:
    sig = "**" if (r["ci_low"] > 0 or r["ci_high"] < 0) else ""
    return f"{sig}{r['mean_diff']:+.4f}{sig} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] {100 * r['a_wins']:.0f}%"


def tables() -> str:
    paired = read_paired_csv(FOLDER / "paired.csv")
    summary = read_csv(FOLDER / "summary.csv")
    out = []
    for task, metric, title, pairs in SECTIONS:
        rs = [r for r in paired if r["task"] == task and r["metric"] == metric]
        ratios = sorted({r["ratio"] for r in rs})
        n = max((r["n"] for r in rs), default=0)
        better = "lower" if rs and rs[0]["lower_is_better"] else "higher"
        out += [f"#### {title} (`{task}`, `{metric}`, {better} is better, n = {n} paired samples)", "",
                "| a − b | " + " | ".join(f"ratio {x}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for a, b in pairs:
            by = {r["ratio"]: r for r in rs if (r["a"], r["b"]) == (a, b)}
            if by:
                out.append(f"| `{a}` − `{b}` | " + " | ".join(cell(by[x]) if x in by else "" for x in ratios) + " |")
        out.append("")
    shift = {(r["task"], r["ratio"]): r["mean"] for r in summary if r["metric"] == "shift" and r["press"] == "adakv_snapkv"}
    out += ["#### Budget moved between heads by AdaKV (`shift`: share of a layer's budget, mean over layers and samples)", "",
            "| context | " + " | ".join(f"ratio {x}" for x in sorted({k[1] for k in shift})) + " |",
            "|---|" + "---|" * len({k[1] for k in shift})]
    for task in sorted({k[0] for k in shift}):
        out.append(f"| `{task}` | " + " | ".join(f"{shift[(task, x)]:.3f}" for x in sorted({k[1] for k in shift})) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = FOLDER / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + tables() + END + tail
    if args.check:
        if new != text:
            print(f"{readme}: tables differ from the CSVs; run python scripts/results_tables.py")
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
