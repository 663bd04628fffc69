"""Command line: ``python -m minikv {demo,generate,eval,bench} ...`` (the parser and checks: minikv.cli)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
