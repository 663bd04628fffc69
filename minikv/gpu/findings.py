"""The committed GPU benchmark (``results/gpu/*.json``) as one record per shape, so a lesson computes its claims.

``python -m minikv bench`` writes one row per (model, L, b, ratio, method). A claim such as "ragged takes
0.2x the full-cache time" compares two rows of the same shape; ``shape_records`` puts them side by side:

    >>> recs = shape_records(load_results("bench_h200.json"), ratio=0.75)    # doctest: +SKIP
    >>> recs[0]["ragged_ms"] / recs[0]["full_ms"]                              # doctest: +SKIP

Keys of a record: model, L, b, ratio; ``<method>_ms`` (eager time, ms) and ``<method>_graph_ms`` (the same
call replayed from a CUDA graph: the GPU's own time, no Python or launch cost) for every method the run
timed; ``ragged_graph_two_launch_ms`` where the run also timed the kernel with its merge as a second launch; ``Lmax`` (longest kept head, padded run); ``<method>_bytes`` (K + V bytes that method must read);
``floor_ms`` / ``full_floor_ms`` (those bytes of the ragged / full cache at the copy bandwidth of the same run:
the memory floor of one step).

The end-to-end runs (``python -m minikv.gpu.e2e``: one row per method, press and ratio of a whole decode step)
are read with ``e2e_row`` and ``e2e_target``; ``print_e2e`` prints one of them as a table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .e2e import STEP_VARIANTS


def results_dir(start: Path | None = None) -> Path:
    """The repository's results/gpu folder, found from ``start`` (default: the working directory) upwards."""
    start = Path.cwd() if start is None else Path(start)
    for p in [start, *start.parents]:
        if (p / "results" / "gpu").is_dir():
            return p / "results" / "gpu"
    raise FileNotFoundError(f"no results/gpu folder in {start} or any folder above it")


def load_results(name: str, start: Path | None = None) -> dict:
    """One JSON file of results/gpu, e.g. ``load_results("bench_h200.json")``."""
    path = results_dir(start) / name
    if not path.exists():
        have = sorted(p.name for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"name must be a JSON file of {path.parent}: one of {have}; got {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def shape_records(data: dict, ratio: float) -> list[dict]:
    """One record per (model, L, b) of a ``bench`` run at compression ``ratio``, every method side by side."""
    ratios = sorted({r["ratio"] for r in data["rows"] if r["method"] != "full"})
    if ratio not in ratios:
        raise ValueError(f"ratio must be one the run measured, one of {ratios}; got {ratio!r}")
    bw = data["meta"]["copy_bw"]
    recs: dict[tuple, dict] = {}
    for r in data["rows"]:
        if r["ratio"] not in (0.0, ratio):
            continue
        key = (r["model"], r["L"], r["b"])
        rec = recs.setdefault(key, dict(model=r["model"], L=r["L"], b=r["b"], ratio=ratio))
        m = r["method"]
        rec[f"{m}_ms"] = r["ms"]
        rec[f"{m}_bytes"] = r["read_bytes"]
        if "graph_ms" in r:
            rec[f"{m}_graph_ms"] = r["graph_ms"]
        if "graph_ms_two_launch" in r:  # the kernel with its merge as a second launch (issue-13 run 1 on)
            rec[f"{m}_graph_two_launch_ms"] = r["graph_ms_two_launch"]
        if "Lmax" in r:
            rec["Lmax"] = r["Lmax"]
    out = [rec for rec in recs.values() if "ragged_ms" in rec and "full_ms" in rec]
    for rec in out:
        rec["floor_ms"] = rec["ragged_bytes"] / bw * 1e3
        rec["full_floor_ms"] = rec["full_bytes"] / bw * 1e3
    return out


def print_records(recs: list[dict], columns: dict) -> None:
    """A fixed-width table: ``columns`` maps a header to a function of one record (numbers printed with 3 decimals)."""
    head = f"{'model':8} {'L':>6} {'b':>3} " + " ".join(f"{h:>{max(8, len(h))}}" for h in columns)
    print(head)
    for rec in recs:
        cells = []
        for h, f in columns.items():
            v = f(rec)
            cells.append(f"{v:>{max(8, len(h))}.3f}" if isinstance(v, float) else f"{v!s:>{max(8, len(h))}}")
        print(f"{rec['model']:8} {rec['L']:6d} {rec['b']:3d} " + " ".join(cells))


E2E_METHODS = ("dynamic_eager", "static_sdpa", "static_triton", "compressed", "compressed_eager")
# the variants runs 3-8 also timed: n row groups on n CUDA streams, overlapped groups (attention at p programs/SM or
# the default d), the fused norm + matmul kernels, and the step with or without PDL / Triton matmuls
E2E_VARIANTS = (r"(static_triton|compressed)_(s\d+|ov(d|\d+))|(static_sdpa|static_triton|compressed)_("
                + "|".join(STEP_VARIANTS) + ")|compressed_fused")


def e2e_row(data: dict, method: str, press: str = "no_press", ratio: float = 0.0) -> dict:
    """The one row of an end-to-end run (``e2e_*.json`` with a ``method`` per row) of that method, press and ratio."""
    rows = data["rows"]
    if any("method" not in r for r in rows):
        raise ValueError("data must be an end-to-end run with a 'method' per row (issue 13 on); this one has none")
    if method not in E2E_METHODS and not re.fullmatch(E2E_VARIANTS, method):
        raise ValueError(f"method must be one of {E2E_METHODS} or a variant matching {E2E_VARIANTS!r}; got {method!r}")
    hits = [r for r in rows if (r["method"], r.get("press"), r.get("ratio")) == (method, press, ratio)]
    if len(hits) != 1:
        have = sorted({(r["method"], r.get("press"), r.get("ratio")) for r in rows})
        raise ValueError(f"(method, press, ratio) must name one row of the run, one of {have}; "
                         f"got {(method, press, ratio)!r} ({len(hits)} rows)")
    if "ms_per_step" not in hits[0]:
        raise ValueError(f"row {(method, press, ratio)!r} was not timed: {hits[0].get('error') or hits[0].get('skipped')}")
    return hits[0]


def e2e_target(data: dict, what: str) -> dict:
    """The run's own verdict on one target (``{what, value, met}``), by the exact ``what`` the run wrote."""
    hits = [t for t in data.get("targets", []) if t["what"] == what]
    if len(hits) != 1:
        raise ValueError(f"what must name one target of the run, one of {[t['what'] for t in data.get('targets', [])]}; "
                         f"got {what!r}")
    return hits[0]


def print_e2e(data: dict) -> None:
    """One line per timed row of an end-to-end run: ms/step, its floor, x floor, tokens/s and speed-ups."""
    m = data["meta"]
    print(f"{m['model_kind']}: batch {m['batch']} x {m['context']} tokens, {m['layers']} layers, "
          f"weights {m['weight_bytes'] / 1e9:.2f} GB read per step")
    print(f"{'method':17} {'press':22} {'ratio':>5} {'ms/step':>8} {'floor ms':>8} {'x floor':>7} {'tokens/s':>8} "
          f"{'x SDPA':>6} {'x kernel':>8}")
    for r in data["rows"]:
        if "ms_per_step" not in r:
            continue
        x = r["x_vs"]
        print(f"{r['method']:17} {r['press']:22} {r['ratio']:5.3f} {r['ms_per_step']:8.3f} {r['floor_ms']:8.3f} "
              f"{r['x_floor']:7.2f} {r['tokens_per_s']:8.0f} {x['static_sdpa']:6.2f} {x['static_triton']:8.2f}")
