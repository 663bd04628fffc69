"""The tables of results/gpu/NOTES.md, made from the runs' JSON (so no number is copied by hand).

    python -m minikv.gpu.notes results/gpu            # print the tables
    python -m minikv.gpu.notes results/gpu --write    # replace them inside results/gpu/NOTES.md
    python -m minikv.gpu.notes results/gpu/RUN --write --notes results/gpu/NOTES.md --bench results/gpu/decode_graphs_run1

NOTES.md marks each table's place with ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->``; ``--write``
replaces what lies between (NAME: e2e_smollm2, e2e_llama8b, targets, checks, bench_small, bench_large,
tune_attention, tune_attention_e2e, tune_ops, tune_linear) and
leaves a block alone when its table cannot be made (say which, on stdout). ``--notes``: the NOTES.md to write
(default: the folder's own, else results/gpu/NOTES.md). ``--bench``: where the attention benchmark's JSON is
when the run folder has none (issue-13 run 2 skipped the benchmark: run 1's stays valid). ``--tune A,B``: folders
searched after the run's own for ``tune*.json`` sweeps, first found wins per table (default: runs 5, 3, 4, 6).
``--also A,B``: folders searched for an ``e2e_<model>.json`` the run folder lacks (run 9 re-ran SmolLM2 only).
"""

from __future__ import annotations

import json
import os
import re
import sys

LABELS = {
    "dynamic_eager": "full, DynamicCache, eager",
    "static_sdpa": "full, static + SDPA, graph",
    "static_triton": "full, static + ragged kernel, graph",
    "compressed": "compressed, graph",
    "compressed_eager": "compressed, RaggedCache, eager",
    "compressed_fused": "compressed, graph, ops='fused'",
}
for _n in (1, 2, 4):  # run 3's variants: the same decoder with 1, 2 or 4 row groups on their own CUDA streams
    LABELS[f"static_triton_s{_n}"] = f"full, static + ragged kernel, graph, {_n} stream{'s' if _n > 1 else ''}"
    LABELS[f"compressed_s{_n}"] = f"compressed, graph, {_n} stream{'s' if _n > 1 else ''}"
for _p in ("d", "1", "2", "3", "4"):  # 2 row groups interleaved: small ops and attention on two streams
    _a = "default attention grid" if _p == "d" else f"attention {_p} programs/SM"
    LABELS[f"static_triton_ov{_p}"] = f"full, static + ragged kernel, graph, overlapped, {_a}"
    LABELS[f"compressed_ov{_p}"] = f"compressed, graph, overlapped, {_a}"

STEP_LABELS = {"nopdl": "no PDL, cuBLAS matmuls", "pdl": "PDL, Triton matmuls", "tlin": "no PDL, Triton matmuls",
               "pdlcublas": "PDL, cuBLAS matmuls", "pdl_p3": "PDL, Triton matmuls, attention 3 programs/SM"}
for _v, _a in STEP_LABELS.items():  # run 6 on: the step with or without programmatic dependent launch
    LABELS[f"static_triton_{_v}"] = f"full, static + ragged kernel, graph, {_a}"
    LABELS[f"static_sdpa_{_v}"] = f"full, static + SDPA, graph, {_a}"
    LABELS[f"compressed_{_v}"] = f"compressed, graph, {_a}"


def _load(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def e2e_table(data) -> str:
    """One line per row of an e2e run: time, spread, tokens/s, KV, floor, speed-ups, check."""
    m = data["meta"]
    head = (f"{m['model_kind']}, batch {m['batch']} × {m['context']} tokens, {m['layers']} layers; weights read per step "
            f"{m['weight_bytes'] / 1e9:.3f} GB; copy {m['copy_bw'] / 1e12:.2f} TB/s; {m['repeats']} repeats × {m['steps']} steps "
            f"(eager rows: fewer); {m.get('device', '')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
            f"triton {m.get('triton')}\n\n")
    lines = ["| method | press | ratio | ms/step (median) | spread | tokens/s | KV held GB | floor ms | × floor | "
             "× static SDPA | × best static | × DynamicCache | check vs model |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        label = LABELS.get(r["method"], r["method"])
        if r.get("streams", 1) > 1 and r["method"] in ("static_sdpa", "static_triton", "compressed"):
            label += f" ({r['streams']} streams)"
        if r.get("pdl") and r["method"] in ("static_sdpa", "static_triton", "compressed"):
            label += " (PDL)"
        if "ms_per_step" not in r:
            lines.append(f"| {label} | {r.get('press', '')} | {r.get('ratio', 0)} | {r.get('error') or r.get('skipped')} "
                         "| | | | | | | | | |")
            continue
        x = r.get("x_vs", {})
        chk_s = check_cell(r.get("check"))
        lines.append(f"| {label} | {r.get('press', '')} | {r.get('ratio', 0)} | {r['ms_per_step']:.3f} | "
                     f"{100 * r['spread']:.1f}% | {r['tokens_per_s']:.0f} | {r['kv_bytes'] / 1e9:.3f} | "
                     f"{r['floor_ms']:.3f} | {r['x_floor']:.2f} | {_f(x.get('static_sdpa'), '.2f')} | "
                     f"{_f(r.get('x_vs_best_static'), '.2f')} | {_f(x.get('dynamic_eager'), '.2f')} | {chk_s} |")
    return head + "\n".join(lines)


def check_cell(chk) -> str:
    """The check column: fp32-referenced errors (run 2 on), or run 1's bf16-vs-bf16 numbers for older JSON."""
    if not chk:
        return "–"
    verdict = "ok" if chk.get("passed") else "**failed**"
    if chk.get("error"):
        return f"{verdict} ({str(chk['error'])[:60]})"
    if "rel_err_graph_vs_fp32" in chk:
        return (f"{verdict} (vs fp32: bf16 model {chk['rel_err_eager_bf16_vs_fp32']:.1e}, graph "
                f"{chk['rel_err_graph_vs_fp32']:.1e}; {len(chk.get('decided_token_flips', []))} flips / "
                f"{chk.get('tokens_decided', 0)} decided tokens)")
    return (f"{verdict} (rel {chk.get('logits_rel_err_vs_model', float('nan')):.1e}, "
            f"{chk.get('n_mismatches', '?')} token diffs / {chk.get('steps', 0) * chk.get('rows', 0)})")


def checks_table(runs) -> str:
    """One line per checked decoder: the float32-referenced check (e2e.CHECK_CRITERION) in full."""
    lines = ["| model | method | press | ratio | rows | steps | bf16 model vs fp32 (a) | graph vs fp32 (b) | b / a | "
             "decided tokens | flips | graph = its eager step | bf16 model vs graph (run-1 measure) | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, data in runs:
        for r in data.get("rows", []):
            c = r.get("check")
            if not c or "rel_err_graph_vs_fp32" not in c:
                continue
            a, b = c["rel_err_eager_bf16_vs_fp32"], c["rel_err_graph_vs_fp32"]
            lines.append(f"| {name} | {LABELS.get(r['method'], r['method'])} | {r.get('press', '')} | {r.get('ratio', 0)} | "
                         f"{len(c.get('checked_rows', []))} | {c.get('steps', 0)} | {a:.2e} | {b:.2e} | "
                         f"{_f(b / a if a else None, '.2f')} | {c.get('tokens_decided', 0)} / {c.get('tokens_checked', 0)} | "
                         f"{len(c.get('decided_token_flips', []))} | {'yes' if c.get('graph_tokens_equal_eager') else '**no**'} | "
                         f"{c.get('logits_rel_err_vs_model', float('nan')):.1e}, {c.get('n_mismatches', '?')} token diffs | "
                         f"{'yes' if c.get('passed') else '**no**'} |")
    if len(lines) == 2:
        return "(no fp32-referenced checks in these runs)"
    crit = next((d["meta"].get("check_criterion") for _, d in runs if d["meta"].get("check_criterion")), None)
    return "\n".join(lines) + (f"\n\nCriterion: {crit}." if crit else "")


def targets_table(runs) -> str:
    """The targets, evaluated from the rows by ``minikv.gpu.e2e.targets`` (today's rule, whatever the run stored)."""
    from .e2e import targets

    lines = ["| model | target | measured in row | value | met? |", "|---|---|---|---|---|"]
    for name, data in runs:
        for t in targets(data["rows"], data["meta"]["model_kind"]):
            where = "–" if "row" not in t else f"`{t['row']}`, {t['streams']} stream{'s' if t['streams'] > 1 else ''}"
            lines.append(f"| {name} | {t['what']} | {where} | {t['value']:.3f} | {'**met**' if t['met'] else '**missed**'} |")
    return "\n".join(lines)


def _bench_pairs(data):
    """(full row, ragged row) per (model, L, b, ratio)."""
    full = {(r["model"], r["L"], r["b"]): r for r in data["rows"] if r["method"] == "full"}
    for r in data["rows"]:
        if r["method"] == "ragged":
            yield full[(r["model"], r["L"], r["b"])], r


def bench_small_table(data, ratio=0.75, max_len=16384) -> str:
    """Attention at ratio 0.75 on small caches, GPU (CUDA-graph) time: ragged / full SDPA, fused vs two-launch merge."""
    lines = ["| model | L | b | full SDPA µs | ragged µs (one launch) | ragged / full | two-launch µs | two-launch / full | ≤ 0.3? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f, r in _bench_pairs(data):
        if r["ratio"] != ratio or r["L"] > max_len or "graph_ms" not in r:
            continue
        two = r.get("graph_ms_two_launch")
        q = r["graph_ms"] / f["graph_ms"]
        lines.append(f"| {r['model']} | {r['L']} | {r['b']} | {1e3 * f['graph_ms']:.1f} | {1e3 * r['graph_ms']:.1f} | "
                     f"{q:.3f} | {_f(None if two is None else 1e3 * two, '.1f')} | "
                     f"{_f(None if two is None else two / f['graph_ms'], '.3f')} | {'yes' if q <= 0.3 else '**no**'} |")
    return "\n".join(lines)


def bench_large_table(data, min_bytes=1e9) -> str:
    """Caches of at least 1 GB: the kernel's bandwidth as a fraction of the copy, eager and CUDA graph."""
    copy_bw = data["meta"]["copy_bw"]
    lines = ["| model | L | b | ratio | KV GB | ragged ms | % of copy | graph ms | % of copy (graph) |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in _bench_pairs(data):
        if r["kv_bytes"] < min_bytes:
            continue
        g = r.get("graph_ms")
        lines.append(f"| {r['model']} | {r['L']} | {r['b']} | {r['ratio']} | {r['kv_bytes'] / 1e9:.2f} | {r['ms']:.3f} | "
                     f"{100 * r['frac_copy']:.1f}% | {_f(g, '.3f')} | "
                     f"{_f(None if g is None else 100 * r['read_bytes'] / (g * 1e-3) / copy_bw, '.1f')}% |")
    return "\n".join(lines)


def _bench_json(folders):
    for folder in folders:
        if folder and os.path.isdir(folder):
            name = next((n for n in sorted(os.listdir(folder)) if n.startswith("bench_") and n.endswith(".json")), None)
            if name:
                return os.path.join(folder, name)
    return None


def tables(folder, bench_folder=None, tune_folders=None, also=()) -> dict:
    """The NOTES tables from a run's folder; an e2e file the folder lacks is taken from the first of ``also`` with it."""
    out = {}
    runs = []
    for kind in ("smollm2", "llama8b"):
        fld = next((f for f in [folder, *also] if os.path.exists(os.path.join(f, f"e2e_{kind}.json"))), folder)
        try:
            data = _load(fld, f"e2e_{kind}.json")
        except (OSError, ValueError) as e:  # a truncated file from a run cut short: say so, make the rest
            print(f"minikv.gpu.notes: e2e_{kind}.json unreadable ({e}); its table is left as it was")
            continue
        if data is not None and "meta" in data and "model_kind" in data["meta"]:
            out[f"e2e_{kind}"] = e2e_table(data)
            runs.append((kind, data))
    if runs:
        out["targets"] = targets_table(runs)
        out["checks"] = checks_table(runs)
    for fld in [folder] + list(tune_folders or []):  # the run's own sweeps first, then earlier runs'
        for name in sorted(os.listdir(fld)) if os.path.isdir(fld) else []:
            if not (name.startswith("tune") and name.endswith(".json")):
                continue
            tune, src = _load(fld, name), f"(from `{os.path.join(fld, name)}`)\n\n"
            if tune.get("attention") and "tune_attention" not in out:
                out["tune_attention"] = src + tune_attention_table(tune)
            if tune.get("attention_e2e") and "tune_attention_e2e" not in out:
                out["tune_attention_e2e"] = src + tune_attention_table(tune, "attention_e2e")
            if tune.get("linear") and "tune_linear" not in out:
                out["tune_linear"] = src + tune_linear_table(tune)
            if tune.get("ops") and "tune_ops" not in out:
                out["tune_ops"] = src + tune_ops_table(tune)
    path = _bench_json([folder, bench_folder])
    if path is not None:
        with open(path) as f:
            bench = json.load(f)
        src = "" if os.path.dirname(path) == os.path.normpath(folder) else f"(from `{path}`)\n\n"
        out["bench_small"] = src + bench_small_table(bench)
        out["bench_large"] = src + bench_large_table(bench)
    return out


def tune_attention_table(data, key="attention") -> str:
    """``python -m minikv.gpu.tune``'s attention part: the default plan and the best of the sweep, vs full SDPA.

    The floor column: the compressed store's bytes at the copy bandwidth of the same run (runs that measured it)."""
    rows = data.get(key, [])
    bw = data.get("meta", {}).get("copy_bw")
    case = lambda r: (r["model"], r["L"], r["b"], r.get("heads", "adakv"))
    cases = sorted({case(r) for r in rows if "us" in r})
    lines = ["| model | L | b | heads | floor µs | full SDPA µs | default µs | default / full | ≤ 0.3? | best of sweep µs | "
             "best / full | best settings |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        rs = [r for r in rows if case(r) == c and "us" in r]
        dflt = next((r for r in rs if r.get("config") == "default"), None)
        best = min((r for r in rs if "fused" in r), key=lambda r: r["us"])
        full = best["full_us"]
        cfg = ", ".join(f"{k}={best[k]}" for k in ("fused", "block_n", "num_stages", "num_warps", "programs") if k in best)
        d_us = None if dflt is None else dflt["us"]
        ok = "–" if d_us is None else ("yes" if d_us <= 0.3 * full else "**no**")
        floor = None if not bw else 1e6 * best["kv_bytes"] / bw
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {_f(floor, '.1f')} | {full:.1f} | {_f(d_us, '.1f')} | "
                     f"{_f(None if d_us is None else d_us / full, '.3f')} | {ok} | {best['us']:.1f} | {best['us'] / full:.3f} | {cfg} |")
    return "\n".join(lines)


def tune_ops_table(data) -> str:
    """``python -m minikv.gpu.tune``'s ops part: one layer's small ops, µs of GPU time each, both ways."""
    rows = [r for r in data.get("ops", []) if "us" in r]
    summ = {r["shape"]: r for r in data.get("ops", []) if r.get("op") == "summary"}
    lines = ["| shape | op | µs |", "|---|---|---|"]
    for r in rows:
        if r["op"].startswith(("norm_qkv_rope", "norm_gate_up")):
            continue  # the tile sweep: only its best goes in the summary lines
        lines.append(f"| {r['shape']} | {r['op']} | {r['us']:.1f} |")
    for shape, r in summ.items():
        lines.append(f"| {shape} | **ops='triton': 8 launches besides attention** | **{r['nine_launch_us']:.1f}** |")
        lines.append(f"| {shape} | norm_qkv_rope (best tile) | {r['best_qkv_us']:.1f} |")
        lines.append(f"| {shape} | norm_gate_up (best tile) | {r['best_gate_up_us']:.1f} |")
        lines.append(f"| {shape} | **ops='fused': 4 launches besides attention** (with linear o, down) | **{r['fused_us']:.1f}** |")
    return "\n".join(lines)


def tune_linear_table(data) -> str:
    """``python -m minikv.gpu.tune --parts linear``: each matmul of the step, cuBLAS against the Triton matmul."""
    from .triton_linear import plan_for

    rows = [r for r in data.get("linear", []) if "us" in r]
    lines = ["| model | matmul | M × K @ K × N | bytes µs | cuBLAS µs | Triton, plan_for's tiles µs | tiles | "
             "best of sweep µs | best tiles |", "|---|---|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["op"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["op"]) == key]
        cub = next(r for r in mine if r["impl"] == "cublas")
        sweep = [r for r in mine if r["impl"] == "triton" and "block_n" in r]
        _, bn, bk, nw, ns = plan_for(cub["M"], cub["N"], cub["K"])
        plan = next((r for r in sweep if (r["block_n"], r["block_k"], r["num_stages"]) == (bn, bk, ns)), None)
        best = min(sweep, key=lambda r: r["us"])
        lines.append(f"| {key[0]} | {key[1]} | {cub['M']} × {cub['K']} @ {cub['K']} × {cub['N']} | {cub['floor_us']:.1f} | "
                     f"{cub['us']:.1f} | {_f(None if plan is None else plan['us'], '.1f')} | {bn} × {bk}, {ns} stages | "
                     f"{best['us']:.1f} | {best['block_n']} × {best['block_k']}, {best['num_stages']} stages |")
    return "\n".join(lines)


def fill(text: str, name: str, table: str) -> str:
    """Replace the block between ``<!-- table:name -->`` and ``<!-- /table:name -->`` (markers kept)."""
    pat = re.compile(rf"(<!-- table:{name} -->\n).*?(\n<!-- /table:{name} -->)", re.S)
    if not pat.search(text):
        raise ValueError(f"NOTES.md has no <!-- table:{name} --> ... <!-- /table:{name} --> block")
    return pat.sub(lambda m: m.group(1) + table + m.group(2), text)


def _option(argv, name):
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    values = {_option(argv, o) for o in ("--notes", "--bench", "--tune", "--also")}
    folder = next((a for a in argv if not a.startswith("--") and a not in values), "results/gpu")
    tune = _option(argv, "--tune")
    tune_folders = tune.split(",") if tune else [f"results/gpu/decode_graphs_run{n}" for n in (5, 3, 4, 6)]
    also = _option(argv, "--also")
    made = tables(folder, _option(argv, "--bench") or "results/gpu/decode_graphs_run1", tune_folders,
                  also.split(",") if also else ())
    if "--write" in argv:
        path = _option(argv, "--notes") or os.path.join(folder, "NOTES.md")
        if not os.path.exists(path) and "--notes" not in argv:
            path = os.path.join("results", "gpu", "NOTES.md")
        with open(path) as f:
            text = f.read()
        done = []
        for name, table in made.items():
            if f"<!-- table:{name} -->" in text and f"<!-- /table:{name} -->" in text:
                text = fill(text, name, table)
                done.append(name)
            else:
                print(f"minikv.gpu.notes: {path} has no <!-- table:{name} --> block; not written")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {len(done)} tables into {path}: {', '.join(done)}")
    else:
        for name, table in made.items():
            print(f"<!-- table:{name} -->\n{table}\n<!-- /table:{name} -->\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
