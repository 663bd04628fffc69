"""Draw notebooks/path_en.png and notebooks/path_zh.png: lessons -> exercises (minikv.diagrams.path)."""

import pathlib

import matplotlib

matplotlib.use("Agg")

from minikv.diagrams.path import draw_path  # noqa: E402

root = pathlib.Path(__file__).resolve().parents[1]
for lang in ("en", "zh"):
    draw_path(lang).savefig(root / "notebooks" / f"path_{lang}.png", dpi=110, bbox_inches="tight")
    print(root / "notebooks" / f"path_{lang}.png")
