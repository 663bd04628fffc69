"""Build minikv/data/python_docs.txt.gz: long, natural, non-repetitive English that is the same on every machine.

Source: the documentation that ships with CPython itself -- the help topics of ``pydoc_data.topics``
and the docstrings of standard-library modules (both under the PSF License; see the file's header).
Run once with the Python named in the header; the result is committed, so the evaluation does not
depend on which Python a machine has.

    python scripts/make_natural_text.py
"""

import ast
import gzip
import pathlib
import platform
import sysconfig

MODULES = ["argparse", "asyncio/events", "asyncio/tasks", "calendar", "collections/__init__", "concurrent/futures/_base",
           "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email/message",
           "enum", "fractions", "ftplib", "functools", "gettext", "heapq", "http/client", "http/cookiejar", "imaplib",
           "inspect", "ipaddress", "logging/__init__", "logging/handlers", "mailbox", "multiprocessing/pool", "optparse",
           "pathlib", "pdb", "pickle", "pydoc", "random", "shutil", "smtplib", "statistics", "string", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "tkinter/__init__", "turtle", "typing", "unittest/case",
           "unittest/mock", "urllib/request", "uuid", "weakref", "xml/dom/minidom", "zipfile/__init__"]


LIMIT = 1_600_000  # characters, ~400k SmolLM2 tokens: ~350 disjoint 1k-token windows


def docstrings(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 300 and ">>>" not in doc:  # prose, not short notes or doctest sessions
                out.append(doc.strip())
    return out


def main():
    from pydoc_data.topics import topics

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = [topics[k].strip() for k in sorted(topics)]
    for m in MODULES:
        p = stdlib / f"{m}.py"
        if p.exists():
            parts += docstrings(p)
    # then the rest of the standard library (top level, then one package level down), up to LIMIT characters
    skip = ("test", "idlelib", "site-packages", "lib2to3", "ensurepip", "turtledemo")
    for p in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        rel = str(p.relative_to(stdlib).with_suffix(""))
        if (rel not in MODULES and not p.stem.startswith("_") and not rel.startswith(skip)
                and sum(map(len, parts)) < LIMIT):
            try:
                parts += docstrings(p)
            except (SyntaxError, UnicodeDecodeError):
                pass
    header = (f"# Documentation text of CPython {platform.python_version()} (pydoc_data.topics and standard-library "
              "docstrings), Copyright (c) Python Software Foundation, PSF License Agreement. Made by "
              "scripts/make_natural_text.py for minikv's held-out evaluation.\n\n")
    out = pathlib.Path(__file__).resolve().parents[1] / "minikv" / "data" / "python_docs.txt.gz"
    with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime=0: the same bytes on every run
        f.write((header + "\n\n".join(parts) + "\n").encode("utf-8"))
    print(f"{out}: {len(parts)} texts, {sum(map(len, parts)):,} characters")


if __name__ == "__main__":
    main()
