#!/usr/bin/env python3
"""The README's screenshots of the book: one lesson page in each language, in headless Chromium.

    python book/build.py && python book/screenshots.py     # -> book/screenshots/{en,zh}.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

BOOK = Path(__file__).resolve().parent
sys.path.insert(0, str(BOOK))

from browser import chromium  # noqa: E402

PAGE = "lessons/02_adakv_worked_example.html"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=BOOK / "_build" / "html", help="a built book")
    parser.add_argument("--page", default=PAGE, help=f"page to show (default {PAGE})")
    parser.add_argument("--out", type=Path, default=BOOK / "screenshots")
    parser.add_argument("--scroll", type=int, default=0, help="scroll down this many pixels first")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with chromium(1280, 800) as driver:
        for lang in ("en", "zh"):
            page = args.site.resolve() / lang / args.page
            if not page.is_file():
                raise SystemExit(f"{page} not found: build the book first (python book/build.py)")
            driver.get(page.as_uri())
            driver.execute_async_script("document.fonts.ready.then(arguments[0])")
            driver.execute_script(f"window.scrollTo(0, {args.scroll})")
            time.sleep(0.5)
            target = args.out / f"{lang}.png"
            driver.save_screenshot(str(target))
            print(target)


if __name__ == "__main__":
    main()
