"""The user's own images: one sub-folder per class, any size and any format Pillow reads.

Class names are the sub-folder names, sorted; labels are their positions in that order. Files
and folders whose names start with a dot are skipped (.DS_Store, .git, editor droppings), and so
are files whose extension is no image format Pillow can open (a README next to the images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say, track

GRAYSCALE_MODES = {"1", "L"}  # kept as one channel; every other mode is converted to RGB


def _image_extensions() -> set[str]:
    Image.init()  # registers every plugin, so the list covers all formats Pillow can read
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _visible(path: Path, top: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(top).parts)


def scan(root: Path, key: str = "data.root") -> list[tuple[str, list[Path]]]:
    """The classes under ``root`` and their image files, both sorted.

    Args:
        root: the folder with one sub-folder per class (sub-sub-folders are searched too).
        key: what ``root`` is called in error messages (the params key, or "raw data").
    """
    root = Path(root)
    if not root.is_dir():
        raise ShrinkflowError(f"{key}: {root} is not a folder (expected one sub-folder per class)")
    extensions = _image_extensions()
    classes, skipped = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))
        images = [p for p in files if p.suffix.lower() in extensions]
        skipped += [p for p in files if p.suffix.lower() not in extensions]
        if not images:
            raise ShrinkflowError(
                f"{key}: class {folder.name!r} ({folder}) holds no images; add some or remove it"
            )
        classes.append((folder.name, images))
    if len(classes) < 2:
        raise ShrinkflowError(
            f"{key}: {root} has {len(classes)} class folder(s); a classifier needs at least 2"
        )
    if skipped:
        say(f"imagefolder: skipped {len(skipped)} file(s) that are not images, e.g. {skipped[0]}")
    return classes


def resize(image: Image.Image, size: int) -> np.ndarray:
    """A grayscale or RGB image as a uint8 (size, size, C) array, bilinear-resized if needed.

    The aspect ratio is not kept: every image becomes a square, as the models expect.
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here, naming its path
            mode = "L" if image.mode in GRAYSCALE_MODES else "RGB"
            return resize(image.convert(mode), size)
    except Exception as e:  # Pillow's decoders raise many types on damaged input
        raise ShrinkflowError(f"{path}: not a readable image ({e})") from e


def load_imagefolder(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images under ``root`` as (uint8 N,size,size,C, int64 labels, class names).

    C is 1 when every image is grayscale, else 3 (grayscale images are then replicated to RGB).
    """
    classes = scan(root, key="raw data")
    items = [(path, label) for label, (_, paths) in enumerate(classes) for path in paths]
    arrays = [_decode(path, size) for path, _ in track(items, len(items), "decoding images")]
    channels = max(a.shape[2] for a in arrays)
    images = np.stack([np.repeat(a, channels // a.shape[2], axis=2) for a in arrays])
    labels = np.array([label for _, label in items], dtype=np.int64)
    return images, labels, [name for name, _ in classes]
