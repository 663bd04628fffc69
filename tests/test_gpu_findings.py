"""minikv.gpu.findings joins the benchmark's rows of one shape, as lesson 06 reads them."""

import json
from pathlib import Path

import pytest

from minikv.gpu.findings import load_results, results_dir, shape_records


def fake_run():
    row = lambda method, ratio, ms, read, **kw: dict(model="m", L=1024, b=2, ratio=ratio, method=method, ms=ms,
                                                      read_bytes=read, **kw)
    return dict(meta=dict(copy_bw=1e12), rows=[
        row("full", 0.0, 0.4, 4e6, graph_ms=0.3),
        row("masked", 0.5, 0.6, 4.1e6), row("padded", 0.5, 0.5, 3e6, Lmax=700),
        row("ragged", 0.5, 0.2, 2e6, graph_ms=0.1), row("uniform", 0.5, 0.25, 2e6, graph_ms=0.12),
        row("ragged", 0.75, 0.1, 1e6, graph_ms=0.05),  # another ratio: not mixed in
    ])


def test_one_record_per_shape_with_every_method():
    (rec,) = shape_records(fake_run(), 0.5)
    assert (rec["model"], rec["L"], rec["b"], rec["ratio"]) == ("m", 1024, 2, 0.5)
    assert rec["ragged_ms"] == 0.2 and rec["ragged_graph_ms"] == 0.1 and rec["full_ms"] == 0.4
    assert rec["masked_ms"] == 0.6 and rec["padded_ms"] == 0.5 and rec["Lmax"] == 700
    assert rec["floor_ms"] == pytest.approx(2e6 / 1e12 * 1e3) and rec["full_floor_ms"] == pytest.approx(4e-3)
    (rec75,) = shape_records(fake_run(), 0.75)
    assert rec75["ragged_ms"] == 0.1 and "masked_ms" not in rec75


def test_bad_ratio_and_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="ratio must be one the run measured"):
        shape_records(fake_run(), 0.6)
    (tmp_path / "results" / "gpu").mkdir(parents=True)
    (tmp_path / "results" / "gpu" / "a.json").write_text(json.dumps(fake_run()))
    assert results_dir(tmp_path / "results" / "gpu") == tmp_path / "results" / "gpu"
    assert load_results("a.json", tmp_path)["meta"]["copy_bw"] == 1e12
    with pytest.raises(FileNotFoundError, match="a.json"):
        load_results("b.json", tmp_path)


def test_the_committed_run_is_readable():
    data = load_results("bench_h200.json", results_dir(Path(__file__).parent))
    recs = shape_records(data, 0.75)
    assert len(recs) == len({(r["model"], r["L"], r["b"]) for r in data["rows"]})
    assert all(r["ragged_bytes"] < r["full_bytes"] for r in recs)
