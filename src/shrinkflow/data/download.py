"""`shrinkflow download`: fetch the raw data set named by data.name into one folder.

The folder appears only when everything in it is complete and verified (shrinkflow.outputs.
atomic_dir): a failed download, a checksum mismatch or a refused archive leaves nothing behind.

- digits: scikit-learn's bundled copy (offline), saved as ``digits.npz``.
- cifar10 / cifar100: the official archive, from data.root when it holds one, else downloaded
  from data.mirror or the official site; its MD5 is checked before anything is extracted, and
  the archive plus its extracted top folder are kept.
- imagefolder: a copy of data.root's class folders, so DVC versions the images that were used.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from shrinkflow.data.cifar import ARCHIVES, OFFICIAL_BASE_URL, CifarArchive
from shrinkflow.data.imagefolder import scan
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_dir
from shrinkflow.progress import say, track

DIGITS_FILE = "digits.npz"
CHUNK = 1 << 20  # bytes per read: one progress step, and a bounded amount of memory
TIMEOUT_S = 60  # per socket operation: a stalled server fails the job instead of hanging it


def check_source(cfg: dict) -> None:
    """Fail early, before any output or tracking run exists, when a local source is unusable."""
    data = cfg["data"]
    if data["name"] == "imagefolder":
        scan(Path(data["root"]))
    elif data["name"] in ARCHIVES:
        _local_archive(data["root"], ARCHIVES[data["name"]])


def download(cfg: dict, out_dir: Path) -> dict:
    """Fetch cfg['data']['name'] into ``out_dir``; return facts to log (source, files, bytes)."""
    data = cfg["data"]
    with atomic_dir(Path(out_dir)) as tmp:
        if data["name"] == "digits":
            source = _digits(tmp)
        elif data["name"] == "imagefolder":
            source = _imagefolder(data["root"], tmp)
        else:
            source = _cifar(ARCHIVES[data["name"]], data["root"], data["mirror"], tmp)
        sizes = [p.stat().st_size for p in tmp.rglob("*") if p.is_file()]
        return {"source": source, "files": len(sizes), "bytes": sum(sizes)}


def _digits(out: Path) -> str:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network needed

    digits = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other data set uses.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    np.savez(
        out / DIGITS_FILE,
        images=images,
        labels=digits.target.astype(np.int64),
        classes=np.array([str(c) for c in digits.target_names]),
    )
    return "sklearn.datasets.load_digits"


def _imagefolder(root: str | None, out: Path) -> str:
    if root is None:
        raise ShrinkflowError("data.root: null; imagefolder needs a folder of class sub-folders")
    root_path = Path(root)
    files = [path for _, paths in scan(root_path) for path in paths]
    for path in track(files, len(files), "copying images"):
        target = out / path.relative_to(root_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, target)
        except OSError as e:
            raise ShrinkflowError(f"{path}: cannot copy ({e.strerror or e})") from e
    return str(root_path)


def _cifar(archive: CifarArchive, root: str | None, mirror: str | None, out: Path) -> str:
    partial = out / f".{archive.filename}.part"
    local = _local_archive(root, archive)
    if local is not None:
        source = str(local)
        try:
            shutil.copyfile(local, partial)
        except OSError as e:
            raise ShrinkflowError(f"{local}: cannot copy ({e.strerror or e})") from e
    else:
        source = (mirror or OFFICIAL_BASE_URL).rstrip("/") + "/" + archive.filename
        _fetch(source, partial)
    md5 = _md5(partial)
    if md5 != archive.md5:
        raise ShrinkflowError(
            f"{source}: MD5 {md5} is not the published {archive.md5}; the file is damaged or is "
            "not the official archive"
        )
    target = out / archive.filename
    partial.rename(target)
    _extract(target, out, source)
    if not (out / archive.folder).is_dir():
        raise ShrinkflowError(f"{source}: the archive has no {archive.folder}/ folder")
    return source


def _local_archive(root: str | None, archive: CifarArchive) -> Path | None:
    """data.root's copy of the archive, or None when it has none (then it is downloaded)."""
    if root is None:
        return None
    folder = Path(root)
    if not folder.is_dir():
        raise ShrinkflowError(
            f"data.root: {folder} is not a folder (for CIFAR: a folder holding {archive.filename})"
        )
    path = folder / archive.filename
    if path.is_file():
        return path
    say(f"data.root: {folder} holds no {archive.filename}; downloading it")
    return None


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` in chunks, with progress; any failure is one-line error."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(dest, "wb") as f:
            length = response.headers.get("Content-Length", "")
            expected = int(length) if length.isascii() and length.isdigit() else None
            chunks = iter(lambda: response.read(CHUNK), b"")
            total = -(-expected // CHUNK) if expected else None
            received = 0
            for chunk in track(chunks, total, f"downloading {url.rsplit('/', 1)[-1]}"):
                f.write(chunk)
                received += len(chunk)
    except urllib.error.HTTPError as e:
        raise ShrinkflowError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise ShrinkflowError(f"{url}: cannot connect ({e.reason})") from e
    except (OSError, http.client.HTTPException) as e:
        raise ShrinkflowError(f"{url}: download failed ({e!r})") from e
    if expected is not None and received != expected:
        raise ShrinkflowError(f"{url}: download truncated ({received} of {expected} bytes)")


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        # the published checksum, not a security boundary
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _extract(archive: Path, dest: Path, source: str) -> None:
    """Extract a .tar.gz into ``dest``, refusing links, devices and paths that leave ``dest``.

    The explicit check runs first on every member; tarfile's "data" filter is a second guard.
    """
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # Reading every header first makes a truncated archive fail before anything is written.
            members = tar.getmembers()
            for member in members:
                _check_member(member, root, source)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ShrinkflowError(f"{source}: damaged archive ({e})") from e


def _check_member(member: tarfile.TarInfo, root: Path, source: str) -> None:
    if not (member.isfile() or member.isdir()):
        raise ShrinkflowError(
            f"{source}: refusing archive member {member.name!r}: only files and folders are allowed"
        )
    target = (root / member.name).resolve()
    if target != root and root not in target.parents:
        raise ShrinkflowError(
            f"{source}: refusing archive member {member.name!r}: it would land outside {root}"
        )
