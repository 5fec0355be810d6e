"""Helpers shared by the tests: data-stage configs, file snapshots, the 8x8 digits as prepared
data, and a PreparedData in a file (so a worker process can train on exactly the test's data).
No framework imports: torch and TensorFlow test modules both use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from shrinkflow.data.prepared import PreparedData

# The `train` section the unit tests of both backends start from: one short, deterministic epoch
# (no warm-up, augmentation or label smoothing); each test module changes what it needs.
TRAIN = {
    "epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "warmup_epochs": 0,
    "schedule": "cosine",
    "augment": False,
    "hflip": False,
    "label_smoothing": 0.0,
    "mixed_precision": False,
    "precision": "auto",
    "compile": "auto",
}
# What the training tests use: warm-up, augmentation and label smoothing on, as params.yaml has.
TRAIN_WITH_REGULARISATION = {**TRAIN, "warmup_epochs": 1, "augment": True, "label_smoothing": 0.1}


def make_cfg(
    name: str,
    *,
    root: Path | None = None,
    mirror: str | None = None,
    image_size: int = 16,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """The parts of a validated params dict the data stages read (see params.yaml)."""
    return {
        "seed": seed,
        "data": {
            "name": name,
            "root": None if root is None else str(root),
            "image_size": image_size,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "mirror": mirror,
        },
    }


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, for byte-for-byte comparisons."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def digits_data(train: slice = slice(540, None)) -> PreparedData:
    """scikit-learn's 8x8 digits as prepared data: 1 channel, 360 test, 180 val, 1257 train (or
    the ``train`` slice of the shuffled order instead: ``slice(540, 700)`` is 160 images)."""
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    train_idx = order[train]
    pixels = images[train_idx] / 255.0 if len(train_idx) else np.zeros(1)
    return PreparedData(
        images=images,
        labels=digits.target.astype(np.int64),
        train=train_idx,
        val=order[360:540],
        test=order[:360],
        classes=[str(c) for c in range(10)],
        mean=(float(pixels.mean()),),
        std=(float(pixels.std()) or 1.0,),
        manifest={"fingerprint": "digits-8x8-test"},
    )


def write_data_file(path: Path, data: PreparedData) -> Path:
    """``data`` as the ``.npz`` that ``load_data_file`` (a worker process) reads back."""
    np.savez(
        path,
        images=data.images,
        labels=data.labels,
        train=data.train,
        val=data.val,
        test=data.test,
        classes=np.array(data.classes),
        mean=np.array(data.mean),
        std=np.array(data.std),
        fingerprint=np.array(data.fingerprint),
    )
    return path


def load_data_file(path: Path) -> PreparedData:
    """The PreparedData a test wrote with ``np.savez`` (its arrays, classes, mean, std and
    fingerprint), loaded without pickles."""
    with np.load(path, allow_pickle=False) as a:
        return PreparedData(
            images=a["images"],
            labels=a["labels"],
            train=a["train"],
            val=a["val"],
            test=a["test"],
            classes=[str(c) for c in a["classes"]],
            mean=tuple(float(m) for m in a["mean"]),
            std=tuple(float(s) for s in a["std"]),
            manifest={"fingerprint": str(a["fingerprint"])},
        )
