"""The committed GPU benchmark (``results/gpu/*.json``) as one record per shape, so a lesson computes its claims.

``python -m minikv bench`` writes one row per (model, L, b, ratio, method). A claim such as "ragged takes
0.2x the full-cache time" compares two rows of the same shape; ``shape_records`` puts them side by side:

    >>> recs = shape_records(load_results("bench_h200.json"), ratio=0.75)    # doctest: +SKIP
    >>> recs[0]["ragged_ms"] / recs[0]["full_ms"]                              # doctest: +SKIP

Keys of a record: model, L, b, ratio; ``<method>_ms`` (eager time, ms) and ``<method>_graph_ms`` (the same
call replayed from a CUDA graph: the GPU's own time, no Python or launch cost) for every method the run
timed; ``Lmax`` (longest kept head, padded run); ``<method>_bytes`` (K + V bytes that method must read);
``floor_ms`` / ``full_floor_ms`` (those bytes of the ragged / full cache at the copy bandwidth of the same run:
the memory floor of one step).
"""

from __future__ import annotations

import json
from pathlib import Path


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
