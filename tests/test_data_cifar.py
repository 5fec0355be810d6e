"""CIFAR download and prepare against tiny archives in the official format, served over HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import socket
import struct
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_cfg

from shrinkflow.data import cifar
from shrinkflow.data.download import download
from shrinkflow.data.prepare import prepare
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
CIFAR10_CLASSES += ["dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_PER_BATCH = 10  # one image of each class per batch: 5 per class over 5 batches


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` opcodes, as cPickle did for the official files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _write_batch(path: Path, batch: dict) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(batch)
    # The official files were written by numpy 1, which kept _reconstruct in numpy.core.
    path.write_bytes(
        buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    )


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _data(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, RGB) -> the official (N, 3072) rows of R, G, B planes."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _tiny_tree(folder: Path, name: str) -> dict:
    """Write a tiny official-format folder; return the arrays it holds, for comparison."""
    rng = np.random.default_rng(1)
    spec = cifar.ARCHIVES[name]
    top = folder / spec.folder
    top.mkdir(parents=True)
    if name == "cifar10":
        classes = CIFAR10_CLASSES
        train_labels = [i % 10 for i in range(CIFAR10_TRAIN_PER_BATCH)]
        _write_batch(
            top / spec.meta_file,
            {
                b"label_names": [c.encode() for c in classes],
                b"num_cases_per_batch": 10000,
                b"num_vis": 3072,
            },
        )
    else:
        classes = ["apple", "bee", "cloud", "maple_tree"]
        train_labels = [i % 4 for i in range(20)]  # 5 per class
        _write_batch(
            top / spec.meta_file,
            {
                b"fine_label_names": [c.encode() for c in classes],
                b"coarse_label_names": [b"fruit", b"insects"],
            },
        )
    train_images, labels = [], []
    for file in spec.train_files:
        images = _images(rng, len(train_labels))
        _write_batch(
            top / file,
            {
                b"batch_label": file.encode(),
                spec.label_key: train_labels,
                b"coarse_labels": [0] * len(train_labels),
                b"data": _data(images),
                b"filenames": [b"x.png"] * len(train_labels),
            },
        )
        train_images.append(images)
        labels += train_labels
    test_labels = list(range(len(classes)))
    test_images = _images(rng, len(test_labels))
    _write_batch(
        top / spec.test_file,
        {
            b"batch_label": b"testing batch 1 of 1",
            b"data": _data(test_images),
            spec.label_key: test_labels,
        },
    )
    return {
        "classes": classes,
        "train_images": np.concatenate(train_images),
        "train_labels": np.array(labels),
        "test_images": test_images,
        "test_labels": np.array(test_labels),
    }


def _tar(folder: Path, archive: Path, top: str, extra: tarfile.TarInfo | None = None) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / top, arcname=top)
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isfile() else None)
    return archive


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _expect_md5(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path) -> None:
    """Make the tiny archive the 'published' one, as the real checksum belongs to the real file."""
    entry = dataclasses.replace(cifar.ARCHIVES[name], md5=_md5(archive))
    monkeypatch.setitem(cifar.ARCHIVES, name, entry)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny official-format archives for both data sets (built once: they are only read)."""
    built = {}
    for name, spec in cifar.ARCHIVES.items():
        folder = tmp_path_factory.mktemp(name)
        arrays = _tiny_tree(folder / "tree", name)
        arrays["archive"] = _tar(folder / "tree", folder / "served" / spec.filename, spec.folder)
        built[name] = arrays
    return built


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder, records each path, and can cut every body short."""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        self.server.requests.append(self.path)
        path = Path(self.translate_path(self.path))
        if self.server.truncate and path.is_file():
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def serve():
    """serve(folder, truncate=False) -> (base URL, list of requested paths)."""
    servers = []

    def start(folder: Path, truncate: bool = False) -> tuple[str, list[str]]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(folder)))
        server.requests, server.truncate = [], truncate
        # A short poll interval lets shutdown() return at once instead of after 0.5 s.
        poll = partial(server.serve_forever, poll_interval=0.01)
        threading.Thread(target=poll, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/", server.requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.iterdir()) == []  # no .tmp-* sibling either


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_and_prepare_over_http(tmp_path, monkeypatch, serve, tiny, name):
    spec, arrays = cifar.ARCHIVES[name], tiny[name]
    _expect_md5(monkeypatch, name, arrays["archive"])
    url, requests = serve(arrays["archive"].parent)
    raw = tmp_path / "raw" / name

    facts = download(make_cfg(name, mirror=url.rstrip("/")), raw)

    assert requests == [f"/{spec.filename}"]
    assert facts["source"] == url + spec.filename
    assert (raw / spec.filename).read_bytes() == arrays["archive"].read_bytes()
    assert (raw / spec.folder / spec.test_file).is_file()
    assert facts["files"] == len(spec.train_files) + 3  # batches, test, meta and the archive

    cfg = make_cfg(name, image_size=32, val_fraction=0.2)
    facts = prepare(cfg, raw, tmp_path / "prepared")
    data = load_prepared(tmp_path / "prepared")
    n_train, n_test = len(arrays["train_labels"]), len(arrays["test_labels"])
    assert data.images.shape == (n_train + n_test, 32, 32, 3)
    assert data.classes == arrays["classes"]
    n_val = n_train // 5  # val_fraction 0.2
    assert (facts["train"], facts["val"], facts["test"]) == (n_train - n_val, n_val, n_test)
    # The official test batch is the test split, pixel for pixel and label for label.
    np.testing.assert_array_equal(data.test, np.arange(n_train, n_train + n_test))
    np.testing.assert_array_equal(data.images[data.test], arrays["test_images"])
    np.testing.assert_array_equal(data.labels[data.test], arrays["test_labels"])
    train_and_val = np.sort(np.concatenate([data.train, data.val]))
    np.testing.assert_array_equal(data.images[train_and_val], arrays["train_images"])
    np.testing.assert_array_equal(data.labels[train_and_val], arrays["train_labels"])
    # Stratified: the held-out val split has every class in the same share.
    assert len(set(np.bincount(data.labels[data.val]).tolist())) == 1
    assert data.manifest["test_fraction"] is None


def test_prepare_resizes_cifar(tmp_path, monkeypatch, serve, tiny):
    _expect_md5(monkeypatch, "cifar10", tiny["cifar10"]["archive"])
    url, _ = serve(tiny["cifar10"]["archive"].parent)
    download(make_cfg("cifar10", mirror=url), tmp_path / "raw")
    cfg = make_cfg("cifar10", image_size=20, val_fraction=0.2)
    facts = prepare(cfg, tmp_path / "raw", tmp_path / "prepared")
    assert load_prepared(tmp_path / "prepared").images.shape[1:] == (20, 20, 3)
    assert facts["channels"] == 3 and facts["image_size"] == 20


def test_archive_in_data_root_is_copied_without_any_request(tmp_path, monkeypatch, tiny):
    archive = tiny["cifar10"]["archive"]
    _expect_md5(monkeypatch, "cifar10", archive)
    cfg = make_cfg("cifar10", root=archive.parent, mirror=_closed_port_url())
    facts = download(cfg, tmp_path / "raw")
    assert facts["source"] == str(archive)
    assert (tmp_path / "raw" / "cifar-10-batches-py" / "batches.meta").is_file()


def test_data_root_without_the_archive_falls_back_to_downloading(
    tmp_path, monkeypatch, serve, tiny
):
    _expect_md5(monkeypatch, "cifar10", tiny["cifar10"]["archive"])
    url, requests = serve(tiny["cifar10"]["archive"].parent)
    (tmp_path / "empty").mkdir()
    facts = download(make_cfg("cifar10", root=tmp_path / "empty", mirror=url), tmp_path / "raw")
    assert requests == ["/cifar-10-python.tar.gz"] and facts["source"].startswith(url)


def test_data_root_that_is_no_folder_is_named(tmp_path):
    cfg = make_cfg("cifar10", root=tmp_path / "nowhere", mirror=_closed_port_url())
    with pytest.raises(ShrinkflowError, match=r"^data\.root: .*nowhere is not a folder"):
        download(cfg, tmp_path / "raw")


def test_wrong_md5_fails_and_leaves_nothing(tmp_path, serve, tiny):
    url, _ = serve(tiny["cifar10"]["archive"].parent)  # the published MD5 is not the tiny one's
    out = tmp_path / "raw" / "cifar10"
    with pytest.raises(ShrinkflowError, match=r"cifar-10-python\.tar\.gz: MD5 [0-9a-f]+ is not"):
        download(make_cfg("cifar10", mirror=url), out)
    _assert_nothing_left(out)


def test_truncated_archive_fails_and_leaves_nothing(tmp_path, monkeypatch, serve, tiny):
    good = tiny["cifar10"]["archive"].read_bytes()
    served = tmp_path / "served" / "cifar-10-python.tar.gz"
    served.parent.mkdir()
    served.write_bytes(good[: len(good) * 2 // 3])
    _expect_md5(monkeypatch, "cifar10", served)  # passes the MD5 check: extraction must notice
    url, _ = serve(served.parent)
    out = tmp_path / "raw" / "cifar10"
    with pytest.raises(ShrinkflowError, match="damaged archive"):
        download(make_cfg("cifar10", mirror=url), out)
    _assert_nothing_left(out)


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("name", "kind", "target", "reason"),
    [
        ("../evil", tarfile.REGTYPE, "", "would land outside"),
        ("{tmp}/evil", tarfile.REGTYPE, "", "would land outside"),  # an absolute path
        ("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd", "only files"),
        ("cifar-10-batches-py/hard", tarfile.LNKTYPE, "../../evil", "only files"),
    ],
)
def test_unsafe_member_is_refused_and_leaves_nothing(
    tmp_path, monkeypatch, serve, name, kind, target, reason
):
    _tiny_tree(tmp_path / "tree", "cifar10")
    member = _member(name.format(tmp=tmp_path), kind, target)
    served = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive = _tar(tmp_path / "tree", served, "cifar-10-batches-py", extra=member)
    _expect_md5(monkeypatch, "cifar10", archive)
    url, _ = serve(archive.parent)
    out = tmp_path / "work" / "raw"
    with pytest.raises(ShrinkflowError, match=f"refusing archive member.*{reason}"):
        download(make_cfg("cifar10", mirror=url), out)
    _assert_nothing_left(out)
    assert not (tmp_path / "work" / "evil").exists()
    assert not (tmp_path / "evil").exists()


def test_http_404_names_the_url(tmp_path, serve):
    url, _ = serve(tmp_path)  # an empty folder
    out = tmp_path / "raw" / "cifar100"
    with pytest.raises(ShrinkflowError, match=r"/cifar-100-python\.tar\.gz: HTTP 404"):
        download(make_cfg("cifar100", mirror=url), out)
    _assert_nothing_left(out)


def test_connection_refused_names_the_url(tmp_path):
    url = _closed_port_url()
    out = tmp_path / "raw" / "cifar10"
    with pytest.raises(ShrinkflowError, match=rf"^{url}cifar-10-python\.tar\.gz: cannot connect"):
        download(make_cfg("cifar10", mirror=url), out)
    _assert_nothing_left(out)


def test_truncated_transfer_is_detected(tmp_path, monkeypatch, serve, tiny):
    _expect_md5(monkeypatch, "cifar10", tiny["cifar10"]["archive"])
    url, _ = serve(tiny["cifar10"]["archive"].parent, truncate=True)
    out = tmp_path / "raw" / "cifar10"
    with pytest.raises(ShrinkflowError, match=r"download truncated \(\d+ of \d+ bytes\)"):
        download(make_cfg("cifar10", mirror=url), out)
    _assert_nothing_left(out)


def test_missing_batch_is_named(tmp_path):
    _tiny_tree(tmp_path / "raw", "cifar10")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ShrinkflowError, match="data_batch_3: missing"):
        prepare(make_cfg("cifar10"), tmp_path / "raw", tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()


def test_pickle_with_other_globals_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "data_batch_1"
    # os.mkdir(marker): harmless, but visible if the unpickler ever let it run.
    evil.write_bytes(
        b"\x80\x02cos\nmkdir\nX"
        + struct.pack("<I", len(str(marker)))
        + str(marker).encode()
        + b"\x85R."
    )
    with pytest.raises(ShrinkflowError, match=r"data_batch_1: not an official CIFAR.*os\.mkdir"):
        cifar.read_batch(evil)
    assert not marker.exists()


def test_damaged_batch_is_named(tmp_path):
    _tiny_tree(tmp_path / "raw", "cifar100")
    train = tmp_path / "raw" / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:500])
    with pytest.raises(ShrinkflowError, match=r"cifar-100-python/train: not an official CIFAR"):
        prepare(make_cfg("cifar100"), tmp_path / "raw", tmp_path / "prepared")
