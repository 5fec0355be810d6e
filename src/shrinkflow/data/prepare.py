"""`shrinkflow prepare`: a download folder -> the prepared split every backend reads.

Images are resized to data.image_size (bilinear) and split by class (stratified) with the seed:
CIFAR keeps its official test set and holds data.val_fraction of its training set out for
validation; digits and imagefolder hold data.test_fraction out for testing, then
data.val_fraction of the rest for validation. The folder format is described in prepared.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from shrinkflow.data.cifar import load_cifar
from shrinkflow.data.download import DIGITS_FILE
from shrinkflow.data.imagefolder import load_imagefolder, resize
from shrinkflow.data.prepared import write_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import track


def prepare(cfg: dict, raw_dir: Path, out_dir: Path) -> dict:
    """Turn ``raw_dir`` (the download output) into the prepared split in ``out_dir``.

    Returns facts to log: dataset, num_classes, image_size, channels, split counts, fingerprint.
    """
    data, raw_dir = cfg["data"], Path(raw_dir)
    name, size = data["name"], data["image_size"]
    if not raw_dir.is_dir():
        raise ShrinkflowError(f"{raw_dir}: no downloaded data; run `shrinkflow download` first")
    official_test = None
    if name == "imagefolder":
        images, labels, classes = load_imagefolder(raw_dir, size)
    elif name == "digits":
        images, labels, classes = _load_digits(raw_dir / DIGITS_FILE)
        images = _resize_all(images, size)
    else:
        images, labels, official_test, classes = load_cifar(name, raw_dir)
        images = _resize_all(images, size)
    splits = _split(labels, classes, official_test, cfg["seed"], data)
    manifest = write_prepared(
        Path(out_dir),
        images=images,
        labels=labels,
        splits=splits,
        classes=classes,
        params={
            "dataset": name,
            "image_size": size,
            "seed": cfg["seed"],
            "val_fraction": data["val_fraction"],
            # An official test split makes test_fraction irrelevant; None keeps it out of the hash.
            "test_fraction": None if official_test is not None else data["test_fraction"],
        },
    )
    return {
        "dataset": name,
        "num_classes": manifest["num_classes"],
        "image_size": size,
        "channels": manifest["channels"],
        **manifest["counts"],
        "fingerprint": manifest["fingerprint"],
    }


def _load_digits(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not path.is_file():
        raise ShrinkflowError(f"{path}: missing; run `shrinkflow download` for digits first")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["images"], npz["labels"].astype(np.int64), [str(c) for c in npz["classes"]]
    except (OSError, ValueError, KeyError) as e:
        raise ShrinkflowError(f"{path}: not a digits download ({e})") from e


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, size, size, C), one Pillow bilinear resize per image."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[3]), dtype=np.uint8)
    gray = images.shape[3] == 1
    for i in track(range(len(images)), len(images), f"resizing to {size}x{size}"):
        out[i] = resize(Image.fromarray(images[i, ..., 0] if gray else images[i]), size)
    return out


def _split(
    labels: np.ndarray, classes: list[str], official_test: int | None, seed: int, data: dict
) -> dict[str, np.ndarray]:
    """Stratified train/val/test indices; ``official_test`` counts the official test rows (last)."""
    everything = np.arange(len(labels), dtype=np.int64)
    if official_test is not None:
        first_test = len(labels) - official_test
        pool, test = everything[:first_test], everything[first_test:]
        pool_name = "in the official training set"
    else:
        pool, test = _holdout(
            everything, labels, classes, data["test_fraction"], seed, "data.test_fraction", "in all"
        )
        pool_name = "after the test hold-out"
    train, val = _holdout(
        pool, labels, classes, data["val_fraction"], seed, "data.val_fraction", pool_name
    )
    # Sorted indices: the order inside a split carries no meaning, and sorted reads are faster.
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _holdout(
    pool: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    fraction: float,
    seed: int,
    key: str,
    pool_name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` into (kept, held out), holding out ``fraction`` of every class."""
    if fraction == 0:
        return pool, pool[:0]
    counts = np.bincount(labels[pool], minlength=len(classes))
    for label, count in enumerate(counts):
        if count == 1:
            raise ShrinkflowError(
                f"class {classes[label]!r} has 1 image {pool_name}; the stratified {key} hold-out "
                "needs at least 2 per class: add images to that class"
            )
    present = int(np.count_nonzero(counts))
    held = math.ceil(fraction * len(pool))  # how train_test_split rounds
    if min(held, len(pool) - held) < present:
        raise ShrinkflowError(
            f"{key}: {fraction} of {len(pool)} images {pool_name} leaves {held} held out and "
            f"{len(pool) - held} kept, but both need one image of each of the {present} classes: "
            "add images or change the fraction"
        )
    kept, held_out = train_test_split(
        pool, test_size=fraction, stratify=labels[pool], random_state=seed
    )
    return kept, held_out
