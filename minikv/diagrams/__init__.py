"""Conceptual diagrams for the lessons, drawn with matplotlib from code (no image files are edited by hand).

One module per idea; each exposes ``draw_*(lang="en")`` returning a matplotlib Figure, with
labels in English ("en") or Chinese ("zh") and otherwise the same drawing.
"""
