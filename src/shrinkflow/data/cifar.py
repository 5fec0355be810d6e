"""CIFAR-10 and CIFAR-100 in their official python-version archives.

The batches inside are Python 2 pickles (that is the published format). They are read with an
unpickler that can only build dicts, lists, strings, numbers and numpy arrays, so a tampered
archive cannot run code: any other global is refused.
"""

from __future__ import annotations

import codecs
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shrinkflow.errors import ShrinkflowError

OFFICIAL_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
SIDE = 32  # every official image is 32 x 32 RGB, stored as 3072 bytes: R, G, B planes, row-major


@dataclass(frozen=True)
class CifarArchive:
    filename: str
    md5: str  # published at https://www.cs.toronto.edu/~kriz/cifar.html
    folder: str  # the archive's top folder, kept in the download output
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


ARCHIVES = {
    "cifar10": CifarArchive(
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": CifarArchive(
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        # The 100 fine classes; the 20 coarse super-classes are not used.
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}

# numpy's array-rebuilding function, taken from where this numpy version keeps it.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
# Everything a numpy array pickle needs. The official files name numpy.core (numpy 1); numpy 2
# moved it to numpy._core. _codecs.encode is how protocol-2 pickles written by Python 3 spell bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_batch(path: Path) -> dict:
    """One official batch or meta file as a dict with bytes keys, loaded without running code."""
    if not path.is_file():
        raise ShrinkflowError(f"{path}: missing from the CIFAR download; run `shrinkflow download`")
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle fails in many ways (EOF, struct, memo, numpy errors)
        raise ShrinkflowError(f"{path}: not an official CIFAR batch ({e})") from e
    if not isinstance(batch, dict):
        raise ShrinkflowError(f"{path}: not an official CIFAR batch (a {type(batch).__name__})")
    return batch


def _images_and_labels(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    shape_ok = isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 3 * SIDE * SIDE
    if not shape_ok or data.dtype != np.uint8:
        raise ShrinkflowError(f"{path}: b'data' is not a uint8 (N, {3 * SIDE * SIDE}) array")
    valid = (
        isinstance(labels, list)
        and len(labels) == len(data)
        and all(isinstance(x, int) and 0 <= x < num_classes for x in labels)
    )
    if not valid:
        raise ShrinkflowError(
            f"{path}: {label_key!r} is not a list of {len(data)} labels in 0..{num_classes - 1}"
        )
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes -> (N, H, W, RGB)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def load_cifar(name: str, raw_dir: Path) -> tuple[np.ndarray, np.ndarray, int, list[str]]:
    """Read an extracted download: (images N,32,32,3 uint8, labels int64, n_test, class names).

    The official test batch comes last, so its ``n_test`` images are the final rows.
    """
    archive = ARCHIVES[name]
    folder = Path(raw_dir) / archive.folder
    meta_path = folder / archive.meta_file
    names = read_batch(meta_path).get(archive.names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes) for n in names) or not names:
        raise ShrinkflowError(f"{meta_path}: {archive.names_key!r} is not a list of class names")
    classes = [n.decode("utf-8") for n in names]
    parts = [
        _images_and_labels(folder / f, archive.label_key, len(classes))
        for f in (*archive.train_files, archive.test_file)
    ]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels, len(parts[-1][1]), classes
