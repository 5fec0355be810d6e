"""Render a local HTML file in headless Chromium and report what a reader would see go wrong.

The report's index.html must be self-contained: every request other than file: and data: is
blocked (so no test ever reaches the network) and listed in ``external_requests``. Chromium is
Debian's ``chromium`` package (``make test`` installs it), driven by Playwright without
Playwright's own browser download.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")

# Flags for a closed network, running as root: no sandbox (Chromium refuses to start as root
# with it), no GPU, and none of the background traffic a fresh profile starts (component
# updates, sync, QUIC probes). --disable-dev-shm-usage because containers often mount a
# 64 MB /dev/shm, which crashes Chromium on tall pages.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# A data: URI of an inlined figure runs to megabytes; this much of one is enough to name it.
_DATA_URI_PREFIX = 80

_BROKEN_IMAGES_JS = """
() => Array.from(document.images)
    .filter((img) => !img.complete || img.naturalWidth === 0)
    .map((img) => img.currentSrc || img.src || img.outerHTML)
"""


@dataclass(frozen=True)
class PageCheck:
    """What rendering one page showed.

    Attributes:
        failed_requests: allowed (file:/data:) requests that failed or answered HTTP >= 400.
        external_requests: requests to anything but file:/data:, blocked before they were sent.
        console_errors: console.error messages and uncaught exceptions ("uncaught: ...").
        broken_images: <img> elements that did not load, by src (data: URIs cut to their start).
        ink_fraction: share of screenshot pixels that differ from its most common colour.
        height_px: height of the full-page screenshot.
        title: the document's <title>.
    """

    failed_requests: list[str]
    external_requests: list[str]
    console_errors: list[str]
    broken_images: list[str]
    ink_fraction: float
    height_px: int
    title: str

    def problems(self) -> list[str]:
        """Every failure as one line each; empty for a clean page (handy in assert messages)."""
        return (
            [f"failed request: {u}" for u in self.failed_requests]
            + [f"external request: {u}" for u in self.external_requests]
            + [f"console error: {m}" for m in self.console_errors]
            + [f"broken image: {s}" for s in self.broken_images]
        )


def chromium_available() -> bool:
    """True where Debian's Chromium and the playwright package are both installed."""
    return os.access(CHROMIUM, os.X_OK) and importlib.util.find_spec("playwright") is not None


requires_chromium = pytest.mark.skipif(
    not chromium_available(),
    reason=f"needs {CHROMIUM} and playwright (`make services` installs Chromium)",
)


def ink_fraction(png: Path) -> float:
    """Share of pixels that differ from the most common colour (the background)."""
    with Image.open(png) as img:
        rgb = img.convert("RGB")
    total = rgb.width * rgb.height
    background = max(count for count, _ in rgb.getcolors(maxcolors=total))
    return 1.0 - background / total


def _short(url: str) -> str:
    """``url``, with a long data: URI cut to its start."""
    if url.startswith("data:") and len(url) > _DATA_URI_PREFIX:
        return url[:_DATA_URI_PREFIX] + "..."
    return url


def render_page(html: Path, png: Path, *, width: int = 1280) -> PageCheck:
    """Open ``html`` in headless Chromium, screenshot the full page to ``png`` and check it.

    Args:
        html: the page to open (as a file: URL, so relative links resolve beside it).
        png: where the full-page screenshot goes.
        width: viewport width in CSS pixels; the height grows to fit the page.
    """
    # Imported here so that test modules still import (and skip) where playwright is missing.
    from playwright.sync_api import sync_playwright

    failed: list[str] = []
    external: list[str] = []
    errors: list[str] = []
    blocked: set[str] = set()

    def gate(route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            blocked.add(url)
            external.append(_short(url))
            route.abort("blockedbyclient")

    def gate_websocket(ws) -> None:
        # Not connecting it to a server keeps the socket inside the page.
        external.append(_short(ws.url))
        ws.close()

    def on_failed(request) -> None:
        if request.url in blocked:
            return  # already in external_requests
        failed.append(f"{_short(request.url)} ({request.failure})")

    def on_response(response) -> None:
        if response.status >= 400:
            failed.append(f"{_short(response.url)} (HTTP {response.status})")

    def on_console(message) -> None:
        if message.type == "error":
            errors.append(message.text)

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,  # fresh and empty: no state carried between pages
            executable_path=str(CHROMIUM),
            headless=True,
            args=LAUNCH_ARGS,
            viewport={"width": width, "height": 800},
            service_workers="block",
        )
        try:
            context.route("**/*", gate)
            context.route_web_socket("**/*", gate_websocket)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("requestfailed", on_failed)
            page.on("response", on_response)
            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
            page.goto(Path(html).resolve().as_uri(), wait_until="load")
            page.evaluate("() => document.fonts.ready")
            broken = [_short(src) for src in page.evaluate(_BROKEN_IMAGES_JS)]
            page.screenshot(path=str(png), full_page=True)
            title = page.title()
        finally:
            context.close()

    with Image.open(png) as shot:
        height = shot.height
    return PageCheck(
        failed_requests=failed,
        external_requests=external,
        console_errors=errors,
        broken_images=broken,
        ink_fraction=ink_fraction(png),
        height_px=height,
        title=title,
    )
