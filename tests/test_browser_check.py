"""The headless-browser page check (tests/browser.py) passes a clean page and catches each kind
of failure: blank pages, network requests, missing or corrupt images, and script errors."""

from __future__ import annotations

import base64
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import render_page, requires_chromium
from PIL import Image

pytestmark = requires_chromium


def _png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (120, 80), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _page(folder: Path, body: str, *, title: str = "t") -> Path:
    html = folder / "index.html"
    html.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body>{body}</body></html>",
        encoding="utf-8",
    )
    return html


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but not listening, so a request that got through would be refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_self_contained_page_passes(tmp_path: Path) -> None:
    Image.new("RGB", (40, 40), (20, 90, 200)).save(tmp_path / "local.png")
    html = _page(
        tmp_path,
        "<h1>Accuracy versus size</h1><p>Best model: resnet8, int8.</p>"
        f"<img alt='inline' src='{_png_data_uri()}'><img alt='beside' src='local.png'>",
        title="shrinkflow report",
    )
    check = render_page(html, tmp_path / "shot.png", width=800)

    assert check.problems() == []
    assert check.title == "shrinkflow report"
    assert check.ink_fraction > 0.01
    with Image.open(tmp_path / "shot.png") as shot:
        assert shot.width == 800
        assert shot.height == check.height_px


def test_external_and_broken_resources_are_reported(tmp_path: Path, closed_port: int) -> None:
    local_url = f"http://127.0.0.1:{closed_port}/x.png"
    html = _page(
        tmp_path,
        "<p>text</p>"
        f"<img alt='remote' src='{local_url}'>"
        "<img alt='missing' src='missing.png'>"
        "<img alt='corrupt' src='data:image/png;base64,AAAA'>"
        "<script src='https://example.com/app.js'></script>",
    )
    check = render_page(html, tmp_path / "shot.png")

    assert local_url in check.external_requests
    assert "https://example.com/app.js" in check.external_requests
    assert len(check.failed_requests) == 1
    assert "missing.png" in check.failed_requests[0]
    assert len(check.broken_images) == 3
    assert local_url in check.broken_images
    assert any(src.endswith("/missing.png") for src in check.broken_images)
    assert any(src.startswith("data:image/png;base64,AAAA") for src in check.broken_images)


def test_blank_page_has_no_ink(tmp_path: Path) -> None:
    html = _page(tmp_path, "", title="")
    check = render_page(html, tmp_path / "shot.png")

    assert check.problems() == []
    assert check.ink_fraction < 1e-4


def test_script_errors_are_reported(tmp_path: Path) -> None:
    html = _page(
        tmp_path,
        "<p>text</p><script>console.error('boom-console'); throw new Error('boom-uncaught');"
        "</script>",
    )
    check = render_page(html, tmp_path / "shot.png")

    assert any("boom-console" in m for m in check.console_errors)
    assert any(m.startswith("uncaught:") and "boom-uncaught" in m for m in check.console_errors)
    assert check.failed_requests == check.external_requests == check.broken_images == []
