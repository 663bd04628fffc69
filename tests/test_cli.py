"""The command line checks its arguments before anything heavy, and answers user errors in one line.

* ``minikv.cli`` imports no torch: ``--help``, a usage error and every argument check run without it;
* a bad value, a missing file or a folder that cannot be written ends in one line naming the option,
  exit status 2, before the model loads; no traceback;
* the eval and bench options are the same as the modules that read them.
"""

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minikv import cli

ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv, monkeypatch, capsys, reached=None):
    """cli.main(argv) with the heavy part replaced: -> (exit status, stderr lines).

    The stand-in for cli.run records the checked args in ``reached`` and returns 0 (no model is loaded).
    """
    reached = [] if reached is None else reached
    monkeypatch.setattr(cli, "run", lambda args: reached.append(args) or 0)
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


BAD = [  # (argv, what the one-line message must say)
    (["generate", "--press", "snapvk"], "--press: unknown press name 'snapvk'; known presses: no_press"),
    (["generate", "--compression-ratio", "1.5"], "--compression-ratio must be in [0, 1)"),
    (["generate", "--compression-ratio", "nan"], "--compression-ratio must be in [0, 1)"),
    (["generate", "--press", "no_press", "--compression-ratio", "0.5"], "--press no_press keeps every token"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["generate", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["generate", "--context", "@/no/such/file.txt"], "--context @/no/such/file.txt: no such file"),
    (["generate", "--context", "@/"], "is not a file"),
    (["generate", "--context", "   "], "--context is empty"),
    (["generate", "--device", "gpu"], "--device must be cpu, cuda, cuda:N or mps"),
    (["generate", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["demo", "--compression-ratio", "1.5"], "--compression-ratio must be in [0, 1)"),
    (["demo", "--out", "/no/such/folder/demo.png"], "--out /no/such/folder/demo.png: the folder /no/such/folder does not exist"),
    (["demo", "--out", "demo.txt"], "--out demo.txt: the file type must be one of"),
    (["demo", "--out", "/"], "--out / is a folder"),
    (["eval", "--presses", "snapkv,adakv_snapvk"], "--presses: unknown press name 'adakv_snapvk'"),
    (["eval", "--presses", " , "], "--presses must name at least one press"),
    (["eval", "--ratios", "0.5,1"], "--ratios must be in [0, 1)"),
    (["eval", "--ratios", "half"], "--ratios must be a comma-separated list of floats"),
    (["eval", "--tasks", "passkey:1k"], "--tasks: bad task 'passkey:1k'; expected NAME:TOKENS"),
    (["eval", "--tasks", "haystack:1024"], "--tasks: bad task 'haystack:1024'"),
    (["eval", "--tasks", "passkey:0"], "--tasks: bad task 'passkey:0'"),
    (["eval", "--samples", "0"], "--samples must be >= 1, got 0"),
    (["eval", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["eval", "--max-minutes", "0"], "--max-minutes must be > 0"),
    (["bench", "--lengths", "4096,0"], "--lengths must be >= 1, got 0"),
    (["bench", "--ratios", "0.5,x"], "--ratios must be a comma-separated list of floats"),
    (["bench", "--rep-ms", "-1"], "--rep-ms must be > 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_one_line_before_the_model(argv, message, monkeypatch, capsys):
    reached = []
    rc, err = run_cli(argv, monkeypatch, capsys, reached)
    assert rc == 2 and not reached, "the command started although its arguments are wrong"
    assert len(err) == 1, err
    assert message in err[0], err[0]
    assert err[0].startswith("python -m minikv")


def test_unwritable_out_folders(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, message in [(["eval", "--out", str(a_file)], "is a file; give a folder"),
                          (["eval", "--out", str(a_file / "sub")], "cannot be created"),
                          (["bench", "--out", str(a_file / "sub")], "cannot be created"),
                          (["demo", "--out", str(a_file / "x.png")], "does not exist")]:
        rc, err = run_cli(argv, monkeypatch, capsys)
        assert rc == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_good_arguments_pass_the_checks(tmp_path, monkeypatch, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Some text.", encoding="utf-8")
    for argv in (["generate"], ["generate", "--press", "no_press"], ["generate", "--context", f"@{ctx}", "--press", "snapkv"],
                 ["generate", "--compare", "--compression-ratio", "0.75"], ["eval", "--out", str(tmp_path / "new" / "ev")],
                 ["demo", "--out", str(tmp_path / "d.png")], ["bench", "--out", str(tmp_path / "gpu")]):
        reached = []
        rc, err = run_cli(argv, monkeypatch, capsys, reached)
        assert rc == 0 and len(reached) == 1 and not err, (argv, err)


def run_cli_ok(argv):
    """Parse and check argv, return the args (or fail with the error)."""
    args = cli.build_parser().parse_args(argv)
    cli.CHECKS[args.command](args)
    return args


def test_checked_values(tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Zürich text.", encoding="utf-8")
    args = run_cli_ok(["generate", "--context", f"@{ctx}", "--press", "snapkv"])
    assert args.context_text == "Zürich text." and args.compression_ratio == 0.5
    assert run_cli_ok(["generate", "--press", "no_press"]).compression_ratio == 0.0
    assert cli.check_tasks("passkey:1024, fidelity:768") == [("passkey", 1024), ("fidelity", 768)]


def test_no_traceback_for_errors_during_the_run(tmp_path, capsys):
    """A missing model file is found by load_model, after the checks: still one line, exit status 1."""
    rc = cli.main(["generate", "--model", str(tmp_path / "missing.gguf"), "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "missing.gguf" in err[0] and "MINIKV_TRACEBACK=1" in err[0], err


def test_demo_runs(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000 and "adakv_snapkv" in capsys.readouterr().out


def _options(add):
    p = argparse.ArgumentParser()
    add(p)
    return {a.dest: (tuple(a.option_strings), a.default, a.type, a.choices) for a in p._actions}


def test_eval_and_bench_options_match_their_modules():
    """cli holds copies of the eval/bench options (so --help needs no torch); they must not drift apart."""
    from minikv import evaluate
    from minikv.gpu import bench

    assert _options(cli.add_eval_arguments) == _options(evaluate.add_arguments)
    assert set(cli.EVAL_TASK_NAMES) == set(evaluate.METRICS)  # every task the evaluator knows can be asked for
    assert {t for t, _ in cli.check_tasks(cli.EVAL_DEFAULT_TASKS)} <= set(evaluate.METRICS)
    assert _options(cli.add_bench_arguments) == _options(bench.add_arguments)


# ---- no torch for --help and usage errors ------------------------------------------------------

STUB = textwrap.dedent("""
    import sys, types
    # load minikv.cli without running minikv/__init__.py: only what cli itself imports
    pkg = types.ModuleType("minikv"); pkg.__path__ = [{path!r}]
    sys.modules["minikv"] = pkg
    from minikv.cli import main
    try:
        rc = main({argv!r})
    except SystemExit as e:
        rc = e.code
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", rc)
""")


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["generate", "--press", "snapvk"],
                                  ["eval", "--tasks", "passkey:1k"], ["demo", "--compression-ratio", "2"]])
def test_cli_module_needs_no_torch(argv):
    code = STUB.format(path=str(ROOT / "minikv"), argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("NO-TORCH"), last
    assert "Traceback" not in out.stderr


def test_python_m_minikv_help_imports_no_torch():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "minikv", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0 and "generate" in out.stdout
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported


def test_python_m_minikv_usage_error_no_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "minikv", "generate", "--context", "@/no/such/file.txt"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 2
    assert out.stderr.strip() == "python -m minikv generate: error: --context @/no/such/file.txt: no such file /no/such/file.txt"
