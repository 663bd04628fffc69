"""The book (book/build.py): the committed notebooks as a static bilingual site, checked in Chromium.

The site is built once for this module (no notebook is executed). Static checks read the HTML;
the browser checks open every lesson page in both languages in headless Chromium (Debian's
`chromium` + `chromium-driver`; they skip, saying so, where those are missing).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
sys.path.insert(0, str(BOOK))

import browser  # noqa: E402  (book/browser.py)

LANGS = ("en", "zh")
OTHER = {"en": "zh", "zh": "en"}
LESSONS = sorted(p.stem for p in (ROOT / "notebooks" / "en").glob("*.ipynb"))
EXERCISES = sorted(p.stem for p in (ROOT / "exercises").glob("*.ipynb"))
SOLUTIONS = sorted(p.stem for p in (ROOT / "solutions").glob("*.ipynb"))
LESSON_PAGES = [(lang, name) for lang in LANGS for name in LESSONS]



# ---------------------------------------------------------------- what the notebooks say


def notebook(lang: str, name: str):
    return nbformat.read(ROOT / "notebooks" / lang / f"{name}.ipynb", as_version=4)


def markdown_text(md: str) -> str:
    """Markdown -> its visible words, roughly: no code, no markup characters."""
    md = re.sub(r"`+([^`]*)`+", r"\1", md)
    md = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", md)
    return re.sub(r"\s+", " ", md.replace("**", "").replace("*", "").replace("_", "")).strip()


def title(lang: str, name: str) -> str:
    for cell in notebook(lang, name).cells:
        if cell.cell_type == "markdown":
            m = re.search(r"(?m)^# (.+)$", cell.source)
            if m:
                return markdown_text(m.group(1))
    raise AssertionError(f"notebooks/{lang}/{name}.ipynb has no '# ' title")


def math_count(lang: str, name: str) -> int:
    """$...$ and $$...$$ formulas in the notebook's markdown (code spans and fences removed)."""
    n = 0
    for cell in notebook(lang, name).cells:
        if cell.cell_type != "markdown":
            continue
        src = re.sub(r"```.*?```", "", cell.source, flags=re.S)
        src = re.sub(r"`[^`\n]*`", "", src)
        blocks = re.findall(r"\$\$.+?\$\$", src, flags=re.S)
        src = re.sub(r"\$\$.+?\$\$", "", src, flags=re.S)
        n += len(blocks) + len(re.findall(r"(?<![\\$])\$(?=\S)[^$\n]+?(?<=\S)\$", src))
    return n


def image_count(lang: str, name: str) -> int:
    n = 0
    for cell in notebook(lang, name).cells:
        if cell.cell_type == "markdown":
            n += len(re.findall(r"!\[[^\]]*\]\(", cell.source))
        for out in cell.get("outputs", []):
            n += any(k.startswith("image/") for k in out.get("data", {}))
    return n


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("¶", "").replace("#", "")).strip()


# ---------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book") / "html"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BOOK / "build.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"book/build.py failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"book built in {time.perf_counter() - t0:.0f} s: {proc.stdout.strip().splitlines()[-1]}")
    return out


def test_readme_names_the_book_command_and_shows_the_screenshots():
    cmd = subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), "book-command"],
                         capture_output=True, text=True)
    assert cmd.returncode == 0, cmd.stderr
    assert "book/build.py" in cmd.stdout
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for lang in LANGS:
        shot = f"book/screenshots/{lang}.png"
        assert f"({shot})" in readme, f"README does not show {shot}"
        assert (ROOT / shot).stat().st_size > 10_000


def test_every_page_is_built(site):
    assert (site / "index.html").is_file() and (site / ".nojekyll").is_file()
    assert (site / "_fonts" / "minikv-cjk.woff").stat().st_size > 10_000
    for lang in LANGS:
        assert (site / lang / "index.html").is_file()
        assert (site / lang / "search.html").is_file() and (site / lang / "searchindex.js").is_file()
        assert (site / lang / "references.html").is_file()
        pages = ([f"lessons/{n}" for n in LESSONS] + [f"exercises/{n}" for n in EXERCISES]
                 + [f"solutions/{n}" for n in SOLUTIONS])
        missing = [p for p in pages if not (site / lang / f"{p}.html").is_file()]
        assert not missing, f"{lang}: no page for {missing}"


def test_references_page_lists_the_papers(site):
    for lang in LANGS:
        html = (site / lang / "references.html").read_text(encoding="utf-8")
        for words in ("SnapKV", "Ada-KV", "Output Perturbation", "Attention Sinks", "2502.03805"):
            assert words.lower() in html.lower(), f"{lang}/references.html lacks {words!r}"


_EXTERNAL = [
    re.compile(r"<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc\s*=\s*[\"']?(?:https?:)?//", re.I),
    re.compile(r"<link\b[^>]*\bhref\s*=\s*[\"']?(?:https?:)?//[^>]*>", re.I),
    re.compile(r"url\(\s*[\"']?(?:https?:)?//", re.I),
    re.compile(r"@import\s+[\"'](?:https?:)?//", re.I),
]


def test_nothing_is_loaded_from_the_network(site):
    """No page or stylesheet refers to a script, style, font or image on another host."""
    bad = []
    for f in site.rglob("*"):
        if f.suffix in (".html", ".css"):
            text = f.read_text(encoding="utf-8", errors="ignore")
            for pattern in _EXTERNAL:
                for m in pattern.finditer(text):
                    if pattern.pattern.startswith("<link") and not re.search(r"stylesheet|preload|icon|modulepreload", m.group(0)):
                        continue
                    bad.append(f"{f.relative_to(site)}: {m.group(0)[:120]}")
    assert not bad, "external resources:\n" + "\n".join(bad[:20])
    assert not any("mathjax" in p.name.lower() for p in site.rglob("*.js"))


@pytest.mark.parametrize("lang,name", LESSON_PAGES, ids=[f"{lang}-{name}" for lang, name in LESSON_PAGES])
def test_math_is_mathml(site, lang, name):
    html = (site / lang / "lessons" / f"{name}.html").read_text(encoding="utf-8")
    assert "minikv-math-error" not in html, f"{lang}/{name}: a formula was not converted"
    assert html.count("<math ") >= math_count(lang, name)
    assert "$$" not in re.sub(r"<(pre|script)\b.*?</\1>", "", html, flags=re.S)


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def chrome():
    reason = browser.missing()
    if reason:
        pytest.skip(f"no headless Chromium for the browser checks: {reason}")
    with browser.chromium(1280, 900) as driver:
        driver.set_page_load_timeout(60)
        yield driver


_VISIBLE_PROSE = """
const root = document.querySelector('article') || document.body;
const skip = 'PRE,CODE,SCRIPT,STYLE,MATH,KBD,TEXTAREA';
const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
const parts = [];
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (!el || el.closest(skip) || el.closest('.cell_output')) continue;
  if (!el.getClientRects().length) continue;
  parts.push(n.textContent);
}
return parts.join(' ');
"""

_PAGE_FACTS = """
const article = document.querySelector('article');
const h1 = article.querySelector('h1');
let h1text = '';
if (h1) for (const n of h1.childNodes) if (!(n.classList && n.classList.contains('headerlink'))) h1text += n.textContent;
const imgs = [...article.querySelectorAll('img')].map(i => {
  const r = i.getBoundingClientRect();
  return {src: i.getAttribute('src'), complete: i.complete, natural: i.naturalWidth, w: r.width, h: r.height};
});
const maths = [...article.querySelectorAll('math')].map(m => {
  const r = m.getBoundingClientRect(); return {w: r.width, h: r.height, display: getComputedStyle(m).display};
});
const fonts = [...document.fonts].filter(f => f.family.replace(/"/g, '') === 'minikv CJK').map(f => f.status);
const code = article.querySelectorAll('.cell_input div.highlight').length;
const copy = article.querySelectorAll('.cell_input div.highlight button.copybtn').length;
const outputCopy = article.querySelectorAll('.cell_output button.copybtn').length;
return {title: document.title, h1: h1text, imgs: imgs, maths: maths, fonts: fonts, code: code, copy: copy, outputCopy: outputCopy,
        errors: article.querySelectorAll('.minikv-math-error').length};
"""

_reports: dict[tuple[str, str], dict] = {}
# what would leave the machine (file:, data:, blob: and Chromium's own chrome:// pages do not)
_NETWORK = re.compile(r"(https?|wss?|ftp):", re.I)


def WebDriverWait(driver, timeout):
    from selenium.webdriver.support.ui import WebDriverWait as wait
    return wait(driver, timeout)


def _network_requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _open(driver, url: str) -> dict:
    driver.get_log("browser")
    driver.get_log("performance")            # forget the previous page
    driver.get(url)
    driver.execute_async_script("document.fonts.ready.then(() => arguments[0]())")
    return {"console": [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]}


def report(driver, site: Path, lang: str, name: str) -> dict:
    """Everything the browser shows about one lesson page (loaded once, shared by the tests)."""
    key = (lang, name)
    if key not in _reports:
        page = site / lang / "lessons" / f"{name}.html"
        rep = _open(driver, page.as_uri())
        rep.update(driver.execute_script(_PAGE_FACTS))
        rep["prose"] = driver.execute_script(_VISIBLE_PROSE)
        rep["requests"] = _network_requests(driver)
        switch = driver.find_element("css selector", ".header-article-items__end a.minikv-lang-switch")
        before = driver.current_url
        switch.click()
        WebDriverWait(driver, 60).until(
            lambda d: d.current_url != before and d.execute_script("return document.readyState") == "complete")
        rep["switched_url"] = driver.current_url
        rep["switched_h1"] = driver.execute_script(
            "const h = document.querySelector('article h1'); return h ? h.textContent : ''")
        rep["switched_console"] = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        _reports[key] = rep
    return _reports[key]


@pytest.mark.parametrize("lang,name", LESSON_PAGES, ids=[f"{lang}-{name}" for lang, name in LESSON_PAGES])
def test_lesson_page_in_chromium(chrome, site, lang, name):
    rep = report(chrome, site, lang, name)
    where = f"{lang}/lessons/{name}.html"
    assert not rep["console"], f"{where}: console errors {rep['console']}"
    offsite = [u for u in rep["requests"] if _NETWORK.match(u)]
    assert not offsite, f"{where} asked the network for {offsite}"

    want = normalize(title(lang, name))
    assert normalize(rep["h1"]) == want, f"{where}: h1 {rep['h1']!r}, notebook title {want!r}"
    assert normalize(rep["title"]).startswith(want)

    n_images = image_count(lang, name)
    assert len(rep["imgs"]) >= n_images, f"{where}: {len(rep['imgs'])} images shown, notebook has {n_images}"
    empty = [i["src"] for i in rep["imgs"] if not (i["complete"] and i["natural"] > 0 and i["w"] > 0 and i["h"] > 0)]
    assert not empty, f"{where}: figures not shown: {empty}"

    assert rep["code"] > 0 and rep["copy"] == rep["code"], \
        f"{where}: {rep['copy']} copy buttons for {rep['code']} code cells"
    assert rep["outputCopy"] == 0, f"{where}: copy buttons on outputs"

    n_math = math_count(lang, name)
    assert rep["errors"] == 0
    assert len(rep["maths"]) >= n_math, f"{where}: {len(rep['maths'])} formulas rendered, notebook has {n_math}"
    assert all(m["w"] > 0 and m["h"] > 0 for m in rep["maths"]), f"{where}: a formula has no size"
    assert "$$" not in rep["prose"] and not re.search(r"\\(frac|text|times|lfloor|cdot)\b", rep["prose"]), \
        f"{where}: LaTeX source is visible"

    if lang == "zh":   # Chinese glyphs come from the site's own font file, not from the network
        assert rep["fonts"] and all(s == "loaded" for s in rep["fonts"]), f"{where}: CJK font {rep['fonts']}"


@pytest.mark.parametrize("lang,name", LESSON_PAGES, ids=[f"{lang}-{name}" for lang, name in LESSON_PAGES])
def test_no_literal_bold_markers(chrome, site, lang, name):
    """A literal `**` in the prose: CommonMark did not close a bold (e.g. `**…。**它`)."""
    rep = report(chrome, site, lang, name)
    stars = [m.start() for m in re.finditer(r"\*\*", rep["prose"])]
    context = [rep["prose"][max(0, i - 30):i + 30] for i in stars[:3]]
    assert not stars, f"{lang}/lessons/{name}.html shows literal ** (notebooks/{lang}/{name}.ipynb): {context}"


@pytest.mark.parametrize("lang,name", LESSON_PAGES, ids=[f"{lang}-{name}" for lang, name in LESSON_PAGES])
def test_language_switch_lands_on_the_same_lesson(chrome, site, lang, name):
    rep = report(chrome, site, lang, name)
    other = OTHER[lang]
    assert rep["switched_url"].endswith(f"/{other}/lessons/{name}.html"), rep["switched_url"]
    assert normalize(rep["switched_h1"]) == normalize(title(other, name))
    assert not rep["switched_console"], rep["switched_console"]


@pytest.mark.parametrize("lang", LANGS)
def test_home_page_and_search(chrome, site, lang):
    home = _open(chrome, (site / lang / "index.html").as_uri())
    assert not home["console"], home["console"]
    text = chrome.execute_script("return document.querySelector('article').innerText")
    assert "SnapKV" in text and "AdaKV" in text           # the README's overview
    sidebar = chrome.execute_script("return document.querySelector('.bd-sidebar-primary').innerText")
    for name in LESSONS:
        assert normalize(title(lang, name)) in normalize(sidebar), f"{lang} sidebar lacks lesson {name}"
    requests = _network_requests(chrome)
    assert requests, "the performance log recorded no request at all"
    offsite = [u for u in requests if _NETWORK.match(u)]
    assert not offsite, f"{lang}/index.html asked the network for {offsite}"

    query = {"en": "safeguard", "zh": "缓存"}[lang]
    found = _open(chrome, (site / lang / "search.html").as_uri() + f"?q={query}")
    assert not found["console"], found["console"]
    deadline = time.time() + 20
    hits = 0
    while time.time() < deadline and not hits:
        hits = chrome.execute_script("return document.querySelectorAll('#search-results li, ul.search li').length")
        time.sleep(0.2)
    assert hits > 0, f"{lang}: searching {query!r} found nothing"
