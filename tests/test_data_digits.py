"""digits end to end: the offline default data set, its split and its statistics."""

from __future__ import annotations

import time

import numpy as np
import pytest
from data_fixtures import file_bytes, make_cfg

from shrinkflow.data.download import DIGITS_FILE, download
from shrinkflow.data.prepare import prepare
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError

N_DIGITS = 1797  # images in scikit-learn's bundled copy


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("digits") / "raw"
    facts = download(make_cfg("digits"), folder)
    assert facts == {
        "source": "sklearn.datasets.load_digits",
        "files": 1,
        "bytes": (folder / DIGITS_FILE).stat().st_size,
    }
    return folder


def test_download_saves_uint8_images_without_pickles(raw):
    with np.load(raw / DIGITS_FILE, allow_pickle=False) as npz:
        images, labels, classes = npz["images"], npz["labels"], npz["classes"]
    assert images.shape == (N_DIGITS, 8, 8, 1) and images.dtype == np.uint8
    assert (images.min(), images.max()) == (0, 255)  # 0..16 scaled to the full byte range
    assert labels.dtype == np.int64 and sorted(set(labels.tolist())) == list(range(10))
    assert classes.tolist() == [str(d) for d in range(10)]


def test_prepare_end_to_end(raw, tmp_path):
    facts = prepare(make_cfg("digits", image_size=16), raw, tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    assert data.images.shape == (N_DIGITS, 16, 16, 1) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert (data.num_classes, data.channels, data.image_size) == (10, 1, 16)
    assert data.classes == [str(d) for d in range(10)]
    assert facts == {
        "dataset": "digits",
        "num_classes": 10,
        "image_size": 16,
        "channels": 1,
        "train": len(data.train),
        "val": len(data.val),
        "test": len(data.test),
        "fingerprint": data.fingerprint,
    }
    everything = np.concatenate([data.train, data.val, data.test])
    np.testing.assert_array_equal(np.sort(everything), np.arange(N_DIGITS))  # disjoint, complete
    assert len(data.test) == int(np.ceil(0.2 * N_DIGITS))
    assert len(data.val) == int(np.ceil(0.1 * (N_DIGITS - len(data.test))))


def test_split_is_stratified(raw, tmp_path):
    prepare(make_cfg("digits", image_size=8), raw, tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    overall = np.bincount(data.labels, minlength=10) / N_DIGITS
    for split in (data.train, data.val, data.test):
        share = np.bincount(data.labels[split], minlength=10) / len(split)
        # Each class's share matches the whole set's, up to rounding of one image.
        np.testing.assert_allclose(share, overall, atol=1.5 / len(split) + 1e-9)


def test_mean_and_std_are_those_of_the_train_split(raw, tmp_path):
    prepare(make_cfg("digits", image_size=12), raw, tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    train = data.images[data.train].astype(np.float64) / 255
    np.testing.assert_allclose(data.mean, train.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(data.std, train.std(axis=(0, 1, 2)), rtol=1e-12)
    everything = data.images.astype(np.float64) / 255
    assert data.mean[0] != pytest.approx(everything.mean(), rel=1e-9)  # train only, not all


def test_same_seed_gives_identical_bytes(raw, tmp_path, monkeypatch):
    prepare(make_cfg("digits", seed=3), raw, tmp_path / "a")
    later = time.time() + 86_400  # a day later: no timestamp may leak into the files
    monkeypatch.setattr(time, "time", lambda: later)
    prepare(make_cfg("digits", seed=3), raw, tmp_path / "b")
    first = file_bytes(tmp_path / "a")
    assert sorted(first) == ["images.npy", "labels.npy", "manifest.json", "splits.npz"]
    assert first == file_bytes(tmp_path / "b")


def test_another_seed_gives_another_split(raw, tmp_path):
    prepare(make_cfg("digits", seed=0), raw, tmp_path / "a")
    prepare(make_cfg("digits", seed=1), raw, tmp_path / "b")
    a, b = load_prepared(tmp_path / "a"), load_prepared(tmp_path / "b")
    assert not np.array_equal(a.test, b.test)
    assert len(a.test) == len(b.test)
    assert a.fingerprint != b.fingerprint
    np.testing.assert_array_equal(a.images, b.images)  # same images, only the split moves


def test_zero_val_fraction_gives_an_empty_val_split(raw, tmp_path):
    facts = prepare(make_cfg("digits", val_fraction=0.0), raw, tmp_path / "prepared")
    assert facts["val"] == 0
    assert len(load_prepared(tmp_path / "prepared").val) == 0


def test_prepare_without_download_names_the_folder(tmp_path):
    with pytest.raises(ShrinkflowError, match=r"nothing: no downloaded data"):
        prepare(make_cfg("digits"), tmp_path / "nothing", tmp_path / "prepared")
