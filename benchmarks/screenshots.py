"""The README's screenshot of the report: docs/images/report.png.

Run from the project root inside the virtualenv, after `make run` (or `make screenshots`):

    python benchmarks/screenshots.py [--report results/report/index.html] [--height 900]

Renders the report in headless Chromium exactly as the report's browser test does
(tests/browser.py: Debian's chromium through playwright, every request beyond file: and data:
blocked), refuses a page that did not load cleanly (a failed or external request, a console
error, a broken image), and saves the top of the page, --width x --height CSS pixels, as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the renderer and its launch flags are the tests'

from browser import CHROMIUM, chromium_available, render_page  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "results/report/index.html")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/report.png")
    parser.add_argument("--width", type=int, default=1280, help="viewport width, CSS pixels")
    parser.add_argument("--height", type=int, default=900, help="how much of the page's top")
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"error: {args.report} does not exist: run `make run` first")
    if not chromium_available():
        sys.exit(f"error: needs {CHROMIUM} and playwright (`make services` installs Chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "page.png"
        check = render_page(args.report, full, width=args.width)
        if check.problems():
            sys.exit(f"error: {args.report} did not render cleanly: {'; '.join(check.problems())}")
        with Image.open(full) as page:
            box = (0, 0, min(page.width, args.width), min(page.height, args.height))
            top = page.crop(box).convert("RGB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    top.save(args.out, optimize=True)
    print(f"wrote {args.out} ({top.width}x{top.height}, {args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
