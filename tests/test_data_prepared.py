"""The prepared folder: written once, verified on every load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shrinkflow.data.prepared import channel_stats, load_prepared, write_prepared
from shrinkflow.errors import ShrinkflowError

PARAMS = {"dataset": "tiny", "image_size": 4, "seed": 0, "val_fraction": 0.5, "test_fraction": 0.25}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 4, dtype=np.int64)
    splits = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.array([6, 7])}
    write_prepared(
        tmp_path / "prepared",
        images=images,
        labels=labels,
        splits=splits,
        classes=["no", "yes"],
        params=PARAMS,
    )
    return tmp_path / "prepared"


def test_round_trip(folder):
    data = load_prepared(folder)
    assert data.images.shape == (8, 4, 4, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.train.dtype == np.int64
    assert data.val.tolist() == [4, 5] and data.test.tolist() == [6, 7]
    assert (data.num_classes, data.channels, data.image_size) == (2, 3, 4)
    assert data.manifest["counts"] == {"train": 4, "val": 2, "test": 2}
    assert data.fingerprint == data.manifest["fingerprint"] and len(data.fingerprint) == 64
    assert isinstance(data.mean, tuple) and len(data.std) == 3


@pytest.mark.parametrize("name", ["images.npy", "labels.npy", "splits.npz"])
def test_tampered_file_is_named(folder, name):
    path = folder / name
    body = bytearray(path.read_bytes())
    body[-1] ^= 0xFF
    path.write_bytes(bytes(body))
    with pytest.raises(ShrinkflowError, match=rf"{name}: checksum does not match"):
        load_prepared(folder)


def test_missing_file_is_named(folder):
    (folder / "labels.npy").unlink()
    with pytest.raises(ShrinkflowError, match=r"labels\.npy: missing"):
        load_prepared(folder)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(ShrinkflowError, match=r"manifest\.json: missing"):
        load_prepared(tmp_path)


def test_edited_manifest_breaks_the_fingerprint(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["seed"] = 1  # claims another split than the one on disk
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShrinkflowError, match="fingerprint does not match"):
        load_prepared(folder)


def test_channel_stats_are_exact(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(50, 5, 5, 3), dtype=np.uint8)
    index = np.arange(0, 50, 3)
    mean, std = channel_stats(images, index)
    pixels = images[index].astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-12)


def test_constant_channel_gets_unit_std():
    images = np.full((4, 2, 2, 1), 7, dtype=np.uint8)
    mean, std = channel_stats(images, np.arange(4))
    assert mean == [7 / 255] and std == [1.0]
