"""Sphinx extension of the minikv book.

- Math is converted to MathML at build time with docutils' own LaTeX-to-MathML converter, so
  pages need no MathJax (which Sphinx would load from a CDN) and show math with no script at all.
- Every page gets a link to the same page in the other language (the two languages are two
  sites side by side: <site>/en/... and <site>/zh/...).
"""

from __future__ import annotations

import html
import os
import re

from docutils import nodes
from docutils.utils.math import MathError, latex2mathml
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)

LANGS = {"en": ("zh", "中文", "切换到中文版"), "zh": ("en", "English", "Switch to the English version")}

# docutils rejects CJK characters (e.g. a full-width comma) outside \text{...}: wrap them there.
_TEXT_ARG = re.compile(r"\\(?:text|mbox|textrm|textit|textbf|mathrm|operatorname)\s*\{[^{}]*\}")
_WIDE = re.compile(r"[\u2E80-\u9FFF\uF900-\uFAFF\uFE30-\uFE4F\uFF00-\uFFEF]+")


def _wrap_wide(tex: str) -> str:
    out, pos = [], 0
    for m in _TEXT_ARG.finditer(tex):
        out.append(_WIDE.sub(lambda w: r"\text{%s}" % w.group(), tex[pos:m.start()]))
        out.append(m.group())
        pos = m.end()
    out.append(_WIDE.sub(lambda w: r"\text{%s}" % w.group(), tex[pos:]))
    return "".join(out)


def to_mathml(tex: str, block: bool) -> str:
    """LaTeX -> a <math> element (raises docutils' MathError when it cannot)."""
    return latex2mathml.tex2mathml(_wrap_wide(tex.strip()), as_block=block)


def _convert(self, node, tex: str, block: bool) -> str:
    try:
        return to_mathml(tex, block)
    except MathError as err:
        logger.warning("math not converted to MathML (%s): %s", err, tex, location=node)
        return f'<code class="minikv-math-error">{html.escape(tex)}</code>'


def visit_inline_math(self, node):
    self.body.append(_convert(self, node, node.astext(), block=False))
    raise nodes.SkipNode


def visit_block_math(self, node):
    self.body.append(self.starttag(node, "div", CLASS="minikv-math"))
    if node.get("number"):
        number = get_node_equation_number(self, node)
        self.body.append(f'<span class="eqno">({number})')
        self.add_permalink_ref(node, "Link to this equation")
        self.body.append("</span>")
    parts = [p for p in node.astext().split("\n\n") if p.strip()]
    if node.get("nowrap") or len(parts) == 1:
        self.body.append(_convert(self, node, node.astext(), block=True))
    else:
        for part in parts:
            self.body.append(_convert(self, node, part, block=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


# Chinese prose in the notebooks is wrapped at arbitrary points; a line break between two CJK
# characters would show as a space in the browser (CSS does not remove it), so drop it.
_CJK = "\u2014\u2026\u2E80-\u9FFF\uF900-\uFAFF\uFE30-\uFE4F\uFF00-\uFFEF"  # with —— and ……
_CJK_BREAK = re.compile(rf"(?<=[{_CJK}])[ \t]*\n[ \t]*(?=[{_CJK}])")
_VERBATIM = (nodes.literal_block, nodes.literal, nodes.raw, nodes.math, nodes.math_block, nodes.comment)


def join_cjk_lines(app, doctree):
    """Drop line breaks between CJK characters (MyST gives a soft break a Text node of its own)."""
    for text in list(doctree.findall(nodes.Text)):
        parent = text.parent
        if parent is None or isinstance(parent, _VERBATIM) or "\n" not in text:
            continue
        i = parent.index(text)
        before = parent[i - 1].astext()[-1:] if i > 0 else ""
        after = parent[i + 1].astext()[:1] if i + 1 < len(parent) else ""
        joined = _CJK_BREAK.sub("", before + str(text) + after)[len(before):]
        joined = joined[:len(joined) - len(after)]
        if joined != str(text):
            parent.replace(text, nodes.Text(joined))


def fix_zh_search_stemmer(app, exception):
    """Sphinx 9.0 writes `window.Stemmer = ChineseStemmer;` for Chinese search, a class that does not
    exist (Chinese search uses the English stemmer): a console error and no search. Upstream:
    sphinx-doc/sphinx#14229, fixed by #14416; this does nothing where the file is already right."""
    if exception or app.builder.format != "html":
        return
    path = os.path.join(app.outdir, "_static", "language_data.js")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        code = f.read()
    if "window.Stemmer = ChineseStemmer;" in code and "ChineseStemmer=" not in code.replace(" ", ""):
        with open(path, "w", encoding="utf-8") as f:
            f.write(code.replace("window.Stemmer = ChineseStemmer;", "window.Stemmer = EnglishStemmer;"))


def page_context(app, pagename, templatename, context, doctree):
    lang = os.environ.get("MINIKV_BOOK_LANG", "en")
    other, label, title = LANGS[lang]
    up = "../" * (pagename.count("/") + 1)
    context["minikv_lang"] = lang
    context["minikv_other_lang"] = other
    context["minikv_other_url"] = f"{up}{other}/{pagename}.html"
    context["minikv_other_label"] = label
    context["minikv_other_title"] = title


def setup(app):
    app.add_html_math_renderer("minikv_mathml", (visit_inline_math, None), (visit_block_math, None))
    app.connect("html-page-context", page_context)
    app.connect("doctree-read", join_cjk_lines)
    app.connect("build-finished", fix_zh_search_stemmer)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
