"""Generate exercises/NN_name.ipynb from solutions/NN_name.ipynb (the single source of truth).

In a solution notebook, a code cell marks the part the learner writes:

    def uniform_keep_mask(scores, n_kept):
        ### BEGIN SOLUTION
        ### HINT: scores.topk(n_kept, dim=-1).indices gives each head's best tokens ...
        idx = scores.topk(n_kept, dim=-1).indices
        ...
        ### END SOLUTION

The exercise notebook gets, in place of the region, a stub with the same indentation:

        # your code here · 在这里写你的代码
        raise NotImplementedError(
            "hint: scores.topk(n_kept, dim=-1).indices gives each head's best tokens ..."
        )

Every region needs at least one ``### HINT:`` line. Outputs and execution counts are stripped;
markdown cells are copied unchanged.

    python scripts/make_exercises.py          # (re)write exercises/*.ipynb
    python scripts/make_exercises.py --check  # exit 1 if exercises/ is not what solutions/ generates
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import textwrap

import nbformat

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOLUTIONS, EXERCISES = ROOT / "solutions", ROOT / "exercises"
BEGIN, END, HINT = "### BEGIN SOLUTION", "### END SOLUTION", "### HINT:"


class MarkerError(ValueError):
    """A solution region is malformed (unclosed, nested, or without a hint)."""


def stub(indent: str, hint: str) -> list[str]:
    """The lines that replace one solution region."""
    pieces = textwrap.wrap("hint: " + hint, width=max(40, 96 - len(indent)), drop_whitespace=False)
    pieces = [p for p in pieces if p]
    body = [f"{indent}    {p!r}" for p in pieces]
    return [f"{indent}# your code here · 在这里写你的代码", f"{indent}raise NotImplementedError(", *body, f"{indent})"]


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every BEGIN/END SOLUTION region of a code cell's source by a stub that raises NotImplementedError."""
    out: list[str] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != BEGIN:
            if line.strip() in (END,) or line.strip().startswith(HINT):
                raise MarkerError(f"{where}: {line.strip()!r} outside a solution region (line {i + 1})")
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        hints, j = [], i + 1
        while j < len(lines) and lines[j].strip().startswith(HINT):
            hints.append(lines[j].strip()[len(HINT):].strip())
            j += 1
        while j < len(lines) and lines[j].strip() != END:
            if lines[j].strip() == BEGIN:
                raise MarkerError(f"{where}: nested {BEGIN} at line {j + 1}")
            j += 1
        if j == len(lines):
            raise MarkerError(f"{where}: {BEGIN} at line {i + 1} has no {END}")
        if not hints:
            raise MarkerError(f"{where}: the solution region at line {i + 1} needs a '{HINT} ...' line")
        out.extend(stub(indent, " ".join(hints)))
        i = j + 1
    return "\n".join(out)


def make_exercise(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The exercise notebook generated from a solution notebook (a new object; the input is unchanged)."""
    nb = copy.deepcopy(solution)
    for n, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{name}, cell {n}")
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")}
    return nb


def solution_paths() -> list[pathlib.Path]:
    return sorted(SOLUTIONS.glob("[0-9][0-9]_*.ipynb"))


def generate() -> dict[str, nbformat.NotebookNode]:
    """exercise file name -> generated notebook, for every solution notebook."""
    return {p.name: make_exercise(nbformat.read(p, as_version=4), p.name) for p in solution_paths()}


def drift() -> list[str]:
    """Differences between exercises/ on disk and what solutions/ generates (empty list = in sync)."""
    wanted = generate()
    problems = []
    on_disk = {p.name for p in EXERCISES.glob("[0-9][0-9]_*.ipynb")}
    for name in sorted(on_disk - wanted.keys()):
        problems.append(f"exercises/{name} has no solutions/{name}")
    for name, nb in wanted.items():
        path = EXERCISES / name
        if not path.exists():
            problems.append(f"exercises/{name} is missing")
            continue
        have = nbformat.read(path, as_version=4)
        if len(have.cells) != len(nb.cells):
            problems.append(f"exercises/{name}: {len(have.cells)} cells, solutions generate {len(nb.cells)}")
            continue
        for n, (a, b) in enumerate(zip(have.cells, nb.cells)):
            if a.cell_type != b.cell_type or a.source != b.source:
                problems.append(f"exercises/{name}, cell {n}: differs from the generated {b.cell_type} cell")
            elif a.cell_type == "code" and a.outputs:
                problems.append(f"exercises/{name}, cell {n}: has outputs (exercises are committed without)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if exercises/ drifted")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for p in problems:
            print(p)
        print(f"{len(problems)} difference(s)" if problems else "exercises/ is in sync with solutions/")
        return 1 if problems else 0
    for name, nb in generate().items():
        nbformat.validate(nb)
        nbformat.write(nb, EXERCISES / name)
        print(f"wrote exercises/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
