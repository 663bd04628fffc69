"""Sphinx configuration of the minikv book (one file for both languages).

book/build.py runs Sphinx twice with this folder as the configuration directory and
MINIKV_BOOK_LANG=en or zh; each language is a complete site of its own (sidebar, search index,
interface strings), and every page links to the same page of the other one.
Nothing is fetched at build or view time: notebooks are not executed, math becomes MathML at
build time (minikv_book.py), and the theme's scripts, styles and icon font are local files.
"""

import os
import sys
from pathlib import Path

BOOK = Path(__file__).resolve().parent
sys.path.insert(0, str(BOOK / "_ext"))

LANG = os.environ.get("MINIKV_BOOK_LANG", "en")
if LANG not in ("en", "zh"):
    raise ValueError(f"MINIKV_BOOK_LANG must be 'en' or 'zh', got {LANG!r}")

project = "minikv"
author = "the minikv authors"
copyright = "the minikv authors, Apache-2.0"
language = {"en": "en", "zh": "zh_CN"}[LANG]
html_title = {"en": "minikv: KV-cache compression, step by step",
              "zh": "minikv：一步步学 KV 缓存压缩"}[LANG]

extensions = [
    "myst_nb",                 # reads the committed .ipynb files (with their outputs) and Markdown
    "sphinx_copybutton",       # a copy button on every code cell
    "sphinxcontrib.bibtex",    # the references page
    "minikv_book",             # MathML at build time, the language switch, the CJK web font
]

root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path = [str(BOOK / "_templates")]
html_static_path = [str(BOOK / "_static")]
html_css_files = ["minikv-book.css"]

# Notebooks are shown as committed: never executed here.
nb_execution_mode = "off"
# Widget outputs (progress bars) would need require.js and the widget manager from a CDN:
# drop the widget view and show the outputs' plain-text form instead.
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None),
                              ("html", "application/vnd.jupyter.widget-state+json", None)]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]  # exercises: bilingual H3 sections under one H1

# Math: MathML written at build time (minikv_book.py); no MathJax, nothing loaded.
html_math_renderer = "minikv_mathml"

# Copy buttons on code (inputs and Markdown code blocks), not on printed outputs.
copybutton_selector = "div:not(.output) > div.highlight pre"

bibtex_bibfiles = [str(BOOK / "references.bib")]
bibtex_default_style = "unsrt"

html_theme = "sphinx_book_theme"
html_theme_options = {
    "home_page_in_toc": True,
    "show_navbar_depth": 1,
    "use_download_button": True,
    "use_fullscreen_button": False,
    "article_header_end": ["minikv-lang-switch.html", "article-header-buttons.html"],
    "navigation_with_keys": False,
}
html_sidebars = {"**": ["navbar-logo.html", "minikv-lang-switch.html",
                        "sbt-sidebar-nav.html"]}
html_last_updated_fmt = None
html_show_sourcelink = False
html_copy_source = True   # the download button offers the .ipynb
html_search_language = {"en": "en", "zh": "zh"}[LANG]   # zh: Sphinx segments Chinese words with jieba
# Search result snippets are fetched from _sources/ with fetch(), which browsers refuse for file://
# pages (a console error, and the site is meant to work opened as a file): titles and sections only.
html_show_search_summary = False
# An explicit colour mode (the theme logs a console error on a first visit without one).
html_context = {"default_mode": "auto"}
