"""imagefolder: the user's own images in class sub-folders, any size and format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_cfg
from PIL import Image

from shrinkflow.data.download import download
from shrinkflow.data.prepare import prepare
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError

RED, BLUE = (200, 20, 20), (20, 20, 200)
# (file name, size, mode): several formats, sizes and modes per class.
VARIANTS = [
    ("a.png", (10, 7), "RGB"),
    ("b.jpg", (40, 30), "RGB"),
    ("c.png", (16, 16), "RGBA"),
    ("d.gif", (9, 21), "P"),
    ("e.bmp", (33, 12), "RGB"),
    ("f.webp", (20, 20), "RGB"),
    ("g.tiff", (5, 5), "RGB"),
    ("h.png", (64, 64), "RGB"),
]


def _save(path: Path, size: tuple[int, int], mode: str, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    image = image.convert(mode) if mode != "P" else image.quantize(colors=4)
    image.save(path)


def _folder(root: Path, classes: dict[str, tuple]) -> Path:
    for name, color in classes.items():
        for file, size, mode in VARIANTS:
            _save(root / name / file, size, mode, color)
    return root


def _cfg(root: Path, **overrides) -> dict:
    options = {"image_size": 16, "val_fraction": 0.25, "test_fraction": 0.25, **overrides}
    return make_cfg("imagefolder", root=root, **options)


def test_mixed_sizes_and_formats_are_resized(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    (root / "cat" / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    (root / "dog" / "notes.txt").write_text("not an image")  # no image extension: skipped
    _save(root / ".thumbs" / "x.png", (4, 4), "RGB", RED)  # hidden folder: not a class

    facts = download(_cfg(root), tmp_path / "raw")
    assert facts["files"] == 2 * len(VARIANTS) and facts["source"] == str(root)
    copied = tmp_path / "raw" / "cat" / "b.jpg"
    assert copied.read_bytes() == (root / "cat" / "b.jpg").read_bytes()

    prepare(_cfg(root), tmp_path / "raw", tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    assert data.images.shape == (2 * len(VARIANTS), 16, 16, 3)
    assert data.classes == ["cat", "dog"]
    assert np.bincount(data.labels).tolist() == [len(VARIANTS), len(VARIANTS)]
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 4)
    # Solid colours survive conversion and resizing (JPEG and WebP may shift them slightly).
    expected = np.array([RED, BLUE])[data.labels][:, None, None, :]
    assert np.abs(data.images.astype(int) - expected).max() <= 4


def test_grayscale_only_gives_one_channel(tmp_path):
    root = tmp_path / "scans"
    for name, value in {"light": 220, "dark": 30}.items():
        for i in range(6):
            _save(root / name / f"{i}.png", (12 + i, 9), "L", (value, value, value))
    download(_cfg(root), tmp_path / "raw")
    facts = prepare(_cfg(root, image_size=8), tmp_path / "raw", tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    assert facts["channels"] == 1 and data.images.shape == (12, 8, 8, 1)
    np.testing.assert_array_equal(data.images[data.labels == 1], 220)  # "light" sorts second


def test_one_grayscale_image_among_colour_ones_is_expanded_to_rgb(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    _save(root / "dog" / "z.png", (8, 8), "L", (90, 90, 90))
    data_dir = tmp_path / "prepared"
    prepare(_cfg(root), root, data_dir)  # prepare reads any class folder, downloaded or not
    data = load_prepared(data_dir)
    assert data.channels == 3
    np.testing.assert_array_equal(data.images[-1], 90)  # the last file of the last class


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named(tmp_path, damage):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    broken = root / "dog" / "b.jpg"
    body = broken.read_bytes()
    broken.write_bytes(b"this is no jpeg" if damage == "garbage" else body[: len(body) // 2])
    download(_cfg(root), tmp_path / "raw")
    with pytest.raises(ShrinkflowError, match=r"raw/dog/b\.jpg: not a readable image"):
        prepare(_cfg(root), tmp_path / "raw", tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_empty_class_is_named(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    (root / "bird").mkdir()
    (root / "bird" / "readme.txt").write_text("to do")
    with pytest.raises(ShrinkflowError, match=r"^data\.root: class 'bird' .* holds no images"):
        download(_cfg(root), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_single_class_is_an_error(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED})
    with pytest.raises(ShrinkflowError, match=r"^data\.root: .* 1 class folder\(s\)"):
        download(_cfg(root), tmp_path / "raw")


def test_class_too_small_to_split_is_named(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    _save(root / "owl" / "only.png", (8, 8), "RGB", RED)
    with pytest.raises(ShrinkflowError, match=r"class 'owl' has 1 image .*data\.test_fraction"):
        prepare(_cfg(root), root, tmp_path / "prepared")


def test_too_few_images_for_the_fraction_is_explained(tmp_path):
    root = _folder(tmp_path / "photos", {"cat": RED, "dog": BLUE})
    with pytest.raises(ShrinkflowError, match=r"^data\.val_fraction: 0\.05 of 12 images"):
        prepare(_cfg(root, val_fraction=0.05), root, tmp_path / "prepared")


@pytest.mark.parametrize("root", [None, "missing"])
def test_missing_root_names_data_root(tmp_path, root):
    cfg = make_cfg("imagefolder", root=None if root is None else tmp_path / root)
    with pytest.raises(ShrinkflowError, match=r"^data\.root: "):
        download(cfg, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
