"""minikv.gpu.findings joins the benchmark's rows of one shape, as lesson 06 reads them."""

import json
from pathlib import Path

import pytest

from minikv.gpu.findings import e2e_row, e2e_target, load_results, results_dir, shape_records


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


def fake_e2e():
    row = lambda method, press, ratio, ms, **kw: dict(method=method, press=press, ratio=ratio, ms_per_step=ms, **kw)
    return dict(meta={}, targets=[dict(what="snapkv r0.75: step <= 2x floor", value=2.5, met=False)], rows=[
        row("static_sdpa", "no_press", 0.0, 9.0), row("compressed", "snapkv", 0.75, 2.0),
        row("compressed_eager", "snapkv", 0.75, 20.0), dict(method="compressed", press="adakv", ratio=0.75, error="oom"),
    ])


def test_e2e_row_picks_one_row_and_names_bad_input():
    assert e2e_row(fake_e2e(), "static_sdpa")["ms_per_step"] == 9.0
    assert e2e_row(fake_e2e(), "compressed_eager", "snapkv", 0.75)["ms_per_step"] == 20.0
    with pytest.raises(ValueError, match="method must be one of"):
        e2e_row(fake_e2e(), "static")
    with pytest.raises(ValueError, match=r"must name one row.*'snapkv', 0.5"):
        e2e_row(fake_e2e(), "compressed", "snapkv", 0.5)
    with pytest.raises(ValueError, match="was not timed: oom"):
        e2e_row(fake_e2e(), "compressed", "adakv", 0.75)
    with pytest.raises(ValueError, match="'method' per row"):
        e2e_row(dict(rows=[dict(press="snapkv", ms_per_step=1.0)]), "compressed")  # the issue-7 e2e format
    assert e2e_target(fake_e2e(), "snapkv r0.75: step <= 2x floor")["met"] is False
    with pytest.raises(ValueError, match="what must name one target"):
        e2e_target(fake_e2e(), "step <= 2x floor")


def test_two_launch_time_joins_the_record():
    data = fake_run()
    data["rows"][3]["graph_ms_two_launch"] = 0.08
    (rec,) = shape_records(data, 0.5)
    assert rec["ragged_graph_two_launch_ms"] == 0.08 and "uniform_graph_two_launch_ms" not in rec


def test_the_committed_issue13_runs_are_readable():
    here = results_dir(Path(__file__).parent)
    for name in ("e2e_smollm2.json", "e2e_llama8b.json"):
        data = load_results(f"decode_graphs_run2/{name}", here)
        for method in ("dynamic_eager", "static_sdpa", "static_triton"):
            assert e2e_row(data, method)["floor_ms"] > 0
        snap = e2e_row(data, "compressed", "snapkv", 0.75)
        assert snap["ms_per_step"] < e2e_row(data, "static_triton")["ms_per_step"]
        assert e2e_target(data, "snapkv r0.75: step <= 2x floor")["value"] == pytest.approx(snap["x_floor"])
    final = load_results("decode_graphs_run5/e2e_smollm2.json", here)  # the final code (issue 13, second session)
    one, two = e2e_row(final, "compressed_s1", "snapkv", 0.75), e2e_row(final, "compressed_s2", "snapkv", 0.75)
    assert one["streams"] == 1 and two["streams"] == 2 and one["ms_per_step"] < two["ms_per_step"]
    with pytest.raises(ValueError, match="must name one row"):
        e2e_row(final, "compressed_ov1", "snapkv", 0.75)  # run 5 did not time the overlapped variant
    with pytest.raises(ValueError, match="or a variant matching"):
        e2e_row(final, "compressed_s", "snapkv", 0.75)
    recs = shape_records(load_results("decode_graphs_run1/bench_h200.json", here), 0.75)
    assert all("ragged_graph_two_launch_ms" in r for r in recs)
