"""What a model folder says it is (``node.json``), and the check that its model file agrees.

Every stage labels the folder it writes with ``node.json``: the backend, the registry model,
the DAG stage, the training seed and the sweep point. Later stages and ``evaluate`` trust that
label for what they load, run and report, so a label that disagrees with the file beside it
(a ``vgg16`` node holding a ResNet-20, a baseline holding an int8 program, a torch node holding
a Keras file) must stop the job, not produce results filed under the wrong name. Two checks, both
framework-free and both ending in one ``ShrinkflowError`` line:

- ``read_node`` validates ``node.json`` itself and that the folder holds exactly the model
  file the node promises, of the right container format, and (where that is readable
  without a framework: a TensorFlow node's ``spec.json``, an int8 program's spec) of the
  node's architecture. It runs before a stage opens an MLflow run or imports a framework.
- ``check_artifact`` is called by every backend loader with what the loaded file turned out
  to be (backend, architecture, format, bit width): the root check, which also covers a
  file swapped after ``read_node`` and the formats whose spec only the framework can read.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrinkflow.errors import ShrinkflowError

NODE_FILE = "node.json"
STAGES = ("baseline", "pruned", "finetuned", "quantized")

# The model file of each kind of node, per backend. A "kind" is the format of the weights:
# float (a state dict / a Keras model), fixed (bit-packed fixed-point weights), int8 (a torch
# PT2E program) and tflite (a TFLite flatbuffer, any of its conversion methods).
FILES: dict[str, dict[str, str]] = {
    "torch": {"float": "model.pt", "fixed": "model.pt", "int8": "model.pt2"},
    "tensorflow": {"float": "model.keras", "fixed": "model.fixed.npz", "tflite": "model.tflite"},
}
MODEL_FILES = frozenset(name for files in FILES.values() for name in files.values())
TF_SPEC_FILE = "spec.json"  # a TensorFlow node's spec, beside its model file
PT2_SPEC_ENTRY = "extra/shrinkflow.json"  # a torch int8 program's spec, inside the archive
ZIP_FILES = ("model.pt", "model.pt2", "model.keras", "model.fixed.npz")
TFLITE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer
# a registry or custom_models name (shrinkflow.custom_models.NAME), one path component
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Expected:
    """The model file a node promises: ``kind`` as in ``FILES``, ``bits`` for fixed-point."""

    backend: str
    arch: str
    kind: str
    bits: int | None
    file: str

    def describe(self) -> str:
        width = f" {self.bits}-bit" if self.bits else ""
        return f"a {self.backend} {self.arch}{width} {self.kind} model ({self.file})"


def read_node(model_dir: Path) -> dict:
    """What the model folder is (backend, model, DAG stage, sweep point), from its node.json,
    after checking that the folder holds the model file the node describes."""
    model_dir = Path(model_dir)
    node = _parse(model_dir)
    _check_folder(model_dir, node, expected_artifact(node, model_dir / NODE_FILE))
    return node


def _parse(model_dir: Path) -> dict:
    """node.json as a dict whose identifying keys have valid values; one-line errors."""
    node_file = model_dir / NODE_FILE
    if not node_file.is_file():
        raise ShrinkflowError(
            f"--in {model_dir}: not a model folder (no node.json); train it first"
        )
    redo = f"re-run the stage that wrote {model_dir}"
    try:
        text = node_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ShrinkflowError(f"{node_file}: unreadable ({exc}); {redo}") from None
    if not text.strip():
        raise ShrinkflowError(f"{node_file}: empty; {redo}")
    try:
        node = json.loads(text)
    except ValueError as exc:
        raise ShrinkflowError(f"{node_file}: not valid JSON ({exc}); {redo}") from None
    if not isinstance(node, dict):
        raise ShrinkflowError(
            f"{node_file}: a JSON {type(node).__name__}, not an object with backend, model "
            f"and stage; {redo}"
        )
    from shrinkflow.backends.base import BACKENDS

    for key, allowed in (("backend", BACKENDS), ("stage", STAGES)):
        if node.get(key) not in allowed:
            raise ShrinkflowError(
                f"{node_file}: {key} {node.get(key)!r} is not one of {', '.join(allowed)}"
            )
    model = node.get("model")
    if not isinstance(model, str) or not _MODEL_NAME.fullmatch(model):
        raise ShrinkflowError(f"{node_file}: model {model!r} is not a model name")
    quant = node.get("quant_method") or ""
    if not isinstance(quant, str):
        raise ShrinkflowError(f"{node_file}: quant_method {quant!r} is not a method name")
    if (node["stage"] == "quantized") != bool(quant):
        raise ShrinkflowError(
            f"{node_file}: stage {node['stage']!r} with quant_method {quant!r} (a quantized "
            "node names its method, no other node has one)"
        )
    seed = node.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ShrinkflowError(
            f"{node_file}: seed {seed!r} is not a training seed (a non-negative integer); {redo}"
        )
    return node


def expected_artifact(node: dict, where: Path) -> Expected:
    """The model file ``node`` (a validated node.json, read from ``where``) promises."""
    from shrinkflow.backends.base import QUANT_FAMILIES
    from shrinkflow.quantization import parse_quant_method

    backend = node["backend"]
    quant = node.get("quant_method") or ""
    if not quant:
        kind, bits = "float", None
    else:
        method = parse_quant_method(quant, f"{where}: quant_method")
        if method.family not in QUANT_FAMILIES[backend]:
            raise ShrinkflowError(f"{where}: quant_method {quant!r} does not exist for {backend}")
        if method.family == "fixed":
            kind, bits = "fixed", method.bits
        else:
            kind, bits = ("int8" if backend == "torch" else "tflite"), None
    return Expected(backend, node["model"], kind, bits, FILES[backend][kind])


def _check_folder(model_dir: Path, node: dict, expected: Expected) -> None:
    """The folder holds the promised model file and no other; checks that need no framework."""
    said = f"{model_dir / NODE_FILE} says {expected.describe()}"
    present = sorted(p.name for p in model_dir.iterdir() if p.name in MODEL_FILES)
    path = model_dir / expected.file
    if not path.is_file():
        found = f"it holds {', '.join(present)}" if present else "there is no model file"
        raise ShrinkflowError(f"{said}, but {found}")
    others = [name for name in present if name != expected.file]
    if others:
        raise ShrinkflowError(f"{said}, but it also holds {', '.join(others)}")
    if expected.file in ZIP_FILES and not zipfile.is_zipfile(path):
        raise ShrinkflowError(f"{path}: not a {expected.backend} model file (not a zip archive)")
    if expected.file == FILES["tensorflow"]["tflite"]:
        with path.open("rb") as f:
            head = f.read(8)
        if head[4:8] != TFLITE_IDENTIFIER:
            raise ShrinkflowError(f"{path}: not a TFLite model (no TFL3 identifier)")
    arch = _readable_arch(model_dir, expected)
    if arch is not None and arch != expected.arch:
        raise ShrinkflowError(f"{said}, but its spec describes a {arch}")


def _readable_arch(model_dir: Path, expected: Expected) -> str | None:
    """The architecture the model's spec names, where a framework is not needed to read it."""
    if expected.backend == "tensorflow":
        spec = _json_or_none(model_dir / TF_SPEC_FILE)
        if spec is None:
            raise ShrinkflowError(f"{model_dir / TF_SPEC_FILE}: missing or not a JSON object")
        return spec.get("arch")
    if expected.kind == "int8":
        try:
            with zipfile.ZipFile(model_dir / expected.file) as archive:
                entries = [n for n in archive.namelist() if n.endswith("/" + PT2_SPEC_ENTRY)]
                if len(entries) != 1:
                    return None  # the loader names what is missing
                payload = json.loads(archive.read(entries[0]))
        except (OSError, ValueError, zipfile.BadZipFile, KeyError):
            return None
        spec = payload.get("spec") if isinstance(payload, dict) else None
        return spec.get("arch") if isinstance(spec, dict) else None
    return None


def _json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def check_artifact(
    folder: Path, *, backend: str, arch: str, kind: str, bits: int | None = None
) -> None:
    """Refuse a loaded model file that is not what its folder's node.json says.

    Backend loaders call this with what the file turned out to be. A folder without node.json
    has nothing to compare with (a stage's output being written, a test's folder).
    """
    folder = Path(folder)
    if not (folder / NODE_FILE).is_file():
        return
    node = _parse(folder)
    expected = expected_artifact(node, folder / NODE_FILE)
    found = Expected(backend, arch, kind, bits, FILES.get(backend, {}).get(kind, "?"))
    if found != expected:
        raise ShrinkflowError(
            f"{folder / NODE_FILE} says {expected.describe()}, but the model file is "
            f"{found.describe()}"
        )
