"""The prepared split: one folder of plain arrays that every backend reads (DESIGN.md section 5).

``data/prepared/<name>/`` holds ``images.npy`` (uint8 N,H,W,C, all splits together),
``labels.npy`` (int64 N), ``splits.npz`` (int64 train/val/test indices into the images) and
``manifest.json`` (classes, counts, train-split mean/std, split parameters, a SHA-256 per file and
a fingerprint over them). Arrays are stored without pickles, and every byte is a function of the
inputs and the split parameters alone, so the same seed and data give identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_dir, read_json, write_json

SPLITS = ("train", "val", "test")
IMAGES, LABELS, SPLITS_FILE, MANIFEST = "images.npy", "labels.npy", "splits.npz", "manifest.json"
_STATS_CHUNK = 4096  # images per chunk when counting pixel values (bounded memory on big sets)
# The manifest keys that say how the split was made; the fingerprint covers them.
PARAM_KEYS = ("dataset", "image_size", "seed", "val_fraction", "test_fraction")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays has no single truth value
class PreparedData:
    images: np.ndarray  # uint8 (N, H, W, C), all splits together
    labels: np.ndarray  # int64 (N,)
    train: np.ndarray  # int64 indices into images
    val: np.ndarray
    test: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]  # per channel, train split, on the 0..1 scale
    std: tuple[float, ...]
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(files: dict[str, str], params: dict[str, Any]) -> str:
    """One hash for the content: the files' hashes plus the parameters that made the split."""
    text = json.dumps({"files": files, "params": params}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def channel_stats(images: np.ndarray, index: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and (population) std of ``images[index]`` on the 0..1 scale.

    Counting the 256 possible values per channel is exact and needs no float copy of the images.
    """
    channels = images.shape[3]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(index), _STATS_CHUNK):
        chunk = images[index[start : start + _STATS_CHUNK]]
        for c in range(channels):
            counts[c] += np.bincount(chunk[..., c].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(channels):
        n = counts[c].sum()
        mean = float((values * counts[c]).sum() / n)
        std = float(np.sqrt((((values - mean) ** 2) * counts[c]).sum() / n))
        means.append(mean)
        # A constant channel has std 0; 1.0 keeps normalization ((x - mean) / std) finite.
        stds.append(std if std > 0 else 1.0)
    return means, stds


def write_prepared(
    out_dir: Path,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    classes: list[str],
    params: dict[str, Any],
) -> dict:
    """Write the prepared folder atomically and return its manifest.

    ``params`` holds the PARAM_KEYS values, recorded in the manifest and folded into the
    fingerprint; test_fraction is None where the data set has an official test split.
    """
    params = {k: params[k] for k in PARAM_KEYS}
    mean, std = channel_stats(images, splits["train"])
    with atomic_dir(Path(out_dir)) as tmp:
        np.save(tmp / IMAGES, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
        np.save(tmp / LABELS, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)
        # np.savez stamps zip entries with a fixed date, so equal splits give equal bytes.
        indices = {s: np.asarray(splits[s], dtype=np.int64) for s in SPLITS}
        np.savez(tmp / SPLITS_FILE, **indices)
        files = {name: sha256_file(tmp / name) for name in (IMAGES, LABELS, SPLITS_FILE)}
        manifest = {
            **params,
            "channels": int(images.shape[3]),
            "num_classes": len(classes),
            "classes": list(classes),
            "counts": {s: len(splits[s]) for s in SPLITS},
            "mean": mean,
            "std": std,
            "files": files,
            "fingerprint": fingerprint(files, params),
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ShrinkflowError(f"{path}: missing; run `shrinkflow prepare` to create {folder}")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as e:
        raise ShrinkflowError(f"{path}: not readable JSON ({e})") from e
    required = ("classes", "mean", "std", "files", "fingerprint")
    missing = [k for k in required if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ShrinkflowError(f"{path}: lacks {', '.join(missing)}; re-run `shrinkflow prepare`")
    return manifest


def _verify(folder: Path, manifest: dict) -> None:
    files = manifest["files"]
    for name in (IMAGES, LABELS, SPLITS_FILE):
        path = folder / name
        if not path.is_file():
            raise ShrinkflowError(f"{path}: missing; re-run `shrinkflow prepare`")
        if name not in files or sha256_file(path) != files[name]:
            raise ShrinkflowError(
                f"{path}: checksum does not match {folder / MANIFEST}; the file was modified or "
                "damaged, re-run `shrinkflow prepare`"
            )
    params = {k: manifest.get(k) for k in PARAM_KEYS}
    if fingerprint(files, params) != manifest["fingerprint"]:
        raise ShrinkflowError(f"{folder / MANIFEST}: fingerprint does not match its contents")


def load_prepared(folder: Path) -> PreparedData:
    """Load a prepared folder after checking every file against the manifest's checksums."""
    folder = Path(folder)
    manifest = _manifest(folder)
    _verify(folder, manifest)
    try:  # allow_pickle=False: an object array (a pickle) is refused, never unpickled
        images = np.load(folder / IMAGES, allow_pickle=False)
        labels = np.load(folder / LABELS, allow_pickle=False)
        with np.load(folder / SPLITS_FILE, allow_pickle=False) as npz:
            splits = {s: npz[s] for s in SPLITS}
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkflowError(f"{folder}: unreadable prepared arrays ({reason})") from None
    if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != (len(images),):
        raise ShrinkflowError(
            f"{folder}: images {images.dtype}{images.shape} and labels {labels.shape} do not form "
            "a prepared set (uint8 N,H,W,C and N labels)"
        )
    return PreparedData(
        images=images,
        labels=labels,
        classes=list(manifest["classes"]),
        mean=tuple(float(m) for m in manifest["mean"]),
        std=tuple(float(s) for s in manifest["std"]),
        manifest=manifest,
        **splits,
    )


def check_fits(spec: dict, data: PreparedData, model_file: Path) -> None:
    """Refuse to score a model on data with another shape or another class list.

    ``spec`` is a model file's spec (every backend stores ``in_channels``, ``image_size`` and
    ``classes``); ``model_file`` names the file in the message.
    """
    wanted = (spec["in_channels"], spec["image_size"], list(spec["classes"]))
    found = (data.channels, data.image_size, list(data.classes))
    if wanted != found:
        raise ShrinkflowError(
            f"{model_file}: model expects {wanted[0]}-channel {wanted[1]}px images of "
            f"{len(wanted[2])} classes, prepared data has {found[0]}-channel {found[1]}px "
            f"images of {len(found[2])} classes (or other class names)"
        )
    for split in ("val", "test"):
        if len(getattr(data, split)) == 0:
            raise ShrinkflowError(f"prepared data: the {split} split is empty")
