"""A model folder's node.json and its model file must agree, and a damaged one of either ends
in one ``error:`` line (exit 2, nothing written) through the CLI route ``dvc repro`` takes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_fixtures import CLASSES, SPEC

from shrinkflow import cli
from shrinkflow.backends.torch import pt2e, pt2e_archive
from shrinkflow.backends.torch.artifact import (
    MODEL_FILE,
    load_model,
    save_fixed_point,
    save_model,
)
from shrinkflow.backends.torch.models import create_model
from shrinkflow.data.prepared import write_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import NODE_FILE, read_node

ROOT = Path(__file__).resolve().parents[1]
SHRINKFLOW = str(Path(sys.executable).parent / "shrinkflow")
BASELINE = {"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": 0}


def node(folder: Path, **fields) -> Path:
    """Write ``folder``'s node.json: the torch resnet20 baseline, with ``fields`` changed."""
    (folder / NODE_FILE).write_text(json.dumps({**BASELINE, **fields}))
    return folder


def one_line_error(call, starts: str) -> str:
    with pytest.raises(ShrinkflowError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(starts), message
    return message


# ------------------------------------------------------------------------- node.json itself


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "unreadable"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"backend": "jax", "model": "resnet20", "stage": "baseline"}', "backend 'jax'"),
        (b'{"backend": "torch", "model": "../x", "stage": "baseline"}', "model '../x'"),
        (b'{"backend": "torch", "model": "resnet20", "stage": "tuned"}', "stage 'tuned'"),
        (b'{"backend": "torch", "model": "resnet20", "stage": "quantized"}', "quant_method ''"),
        (
            b'{"backend": "torch", "model": "resnet20", "stage": "baseline", '
            b'"quant_method": "static_int8"}',
            "stage 'baseline' with quant_method",
        ),
        (
            b'{"backend": "torch", "model": "resnet20", "stage": "quantized", '
            b'"quant_method": "float16", "seed": 0}',
            "quant_method 'float16' does not exist for torch",
        ),
        (b'{"backend": "torch", "model": "resnet20", "stage": "baseline"}', "seed None is not"),
        (
            b'{"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": -1}',
            "seed -1 is not a training seed",
        ),
        (
            b'{"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": "1"}',
            "seed '1' is not a training seed",
        ),
    ],
)
def test_a_bad_node_json_is_one_line(tmp_path, content, says):
    (tmp_path / NODE_FILE).write_bytes(content)
    message = one_line_error(lambda: read_node(tmp_path), f"{tmp_path / NODE_FILE}: ")
    assert says in message


# ------------------------------------------------------------------------- torch artefacts


@pytest.fixture(scope="module")
def torch_nodes(tmp_path_factory) -> dict[str, Path]:
    """A resnet20 float model.pt, an 8-bit fixed-point one and an int8 program (no node.json)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("torch-nodes")
    model = create_model("resnet20", 10, in_channels=1, image_size=8).eval()
    folders = {name: root / name for name in ("float", "fixed8", "int8")}
    for folder in folders.values():
        folder.mkdir()
    save_model(model, SPEC, folders["float"])
    save_fixed_point(model, SPEC, 8, folders["fixed8"])
    prepared = pt2e.prepare(model, SPEC, "dynamic")  # dynamic: no calibration, quickest
    pt2e_archive.save(pt2e.convert(prepared), SPEC, folders["int8"])
    return folders


def copy_node(source: Path, target: Path, **fields) -> Path:
    shutil.copytree(source, target)
    return node(target, **fields)


def test_a_model_pt_of_another_architecture_is_refused(torch_nodes, tmp_path):
    folder = copy_node(torch_nodes["float"], tmp_path / "m", model="vgg16")
    read_node(folder)  # the spec inside model.pt takes torch to read: the loader checks it
    message = one_line_error(lambda: load_model(folder), f"{folder / NODE_FILE} says a torch ")
    assert "vgg16 float model (model.pt), but the model file is a torch resnet20" in message


@pytest.mark.parametrize(
    ("source", "fields", "says"),
    [
        ("fixed8", {}, "resnet20 float model (model.pt), but the model file is a torch "
         "resnet20 8-bit fixed model"),
        ("fixed8", {"stage": "quantized", "quant_method": "fixed_w4"}, "4-bit fixed model "
         "(model.pt), but the model file is a torch resnet20 8-bit fixed model"),
        ("float", {"stage": "quantized", "quant_method": "fixed_w8"}, "8-bit fixed model "
         "(model.pt), but the model file is a torch resnet20 float model"),
    ],
)  # fmt: skip
def test_a_model_pt_of_another_format_is_refused(torch_nodes, tmp_path, source, fields, says):
    folder = copy_node(torch_nodes[source], tmp_path / "m", **fields)
    assert says in one_line_error(lambda: load_model(folder), f"{folder / NODE_FILE} says ")


def test_matching_torch_nodes_load(torch_nodes, tmp_path):
    float_dir = copy_node(torch_nodes["float"], tmp_path / "f")
    fixed = copy_node(
        torch_nodes["fixed8"], tmp_path / "q", stage="quantized", quant_method="fixed_w8"
    )
    int8 = copy_node(
        torch_nodes["int8"], tmp_path / "i", stage="quantized", quant_method="dynamic_int8"
    )
    for folder in (float_dir, fixed):
        read_node(folder)
        assert load_model(folder)[1]["arch"] == "resnet20"
    read_node(int8)
    assert pt2e_archive.load(int8)[1]["arch"] == "resnet20"


def test_an_int8_program_of_another_architecture_is_refused(torch_nodes, tmp_path):
    folder = copy_node(
        torch_nodes["int8"], tmp_path / "m", model="vgg16", stage="quantized",
        quant_method="static_int8",
    )  # fmt: skip
    said = f"{folder / NODE_FILE} says a torch vgg16 int8 model (model.pt2), but "
    one_line_error(lambda: read_node(folder), said)  # read from the archive, before any run
    one_line_error(lambda: pt2e_archive.load(folder), said)  # and again by the loader


@pytest.mark.parametrize(
    ("files", "fields", "says"),
    [
        ([], {}, "float model (model.pt), but there is no model file"),
        (["model.keras"], {}, "float model (model.pt), but it holds model.keras"),
        (["model.pt", "model.pt2"], {}, "float model (model.pt), but it also holds model.pt2"),
        (["model.pt"], {"stage": "quantized", "quant_method": "static_int8"},
         "int8 model (model.pt2), but it holds model.pt"),
        (["model.pt"], {"backend": "tensorflow"},
         "float model (model.keras), but it holds model.pt"),
        (["model.keras", "spec.json"], {"backend": "tensorflow", "stage": "quantized",
         "quant_method": "float16"}, "tflite model (model.tflite), but it holds model.keras"),
    ],
)  # fmt: skip
def test_a_folder_without_the_promised_file_is_refused(torch_nodes, tmp_path, files, fields, says):
    for name in files:
        source = torch_nodes["float"] / MODEL_FILE  # the bytes do not matter here
        (tmp_path / name).write_bytes(source.read_bytes())
    node(tmp_path, **fields)
    assert says in one_line_error(lambda: read_node(tmp_path), f"{tmp_path / NODE_FILE} says ")


# ------------------------------------------------------------------------- TensorFlow artefacts


@pytest.fixture(scope="module")
def tf_nodes(tmp_path_factory) -> dict[str, Path]:
    """An untrained Keras resnet20 as a float, an 8-bit fixed-point and a float32 TFLite node."""
    from shrinkflow.backends.tensorflow import tflite
    from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE, write_spec
    from shrinkflow.backends.tensorflow.artifact import save_fixed_point as save_fixed
    from shrinkflow.backends.tensorflow.artifact import save_model as save_keras
    from shrinkflow.backends.tensorflow.models import create_model as create_keras

    model = create_keras("resnet20", 10, in_channels=1, image_size=8, mean=[0.4], std=[0.3])
    root = tmp_path_factory.mktemp("tf-nodes")
    folders = {name: root / name for name in ("float", "fixed8", "tflite")}
    for folder in folders.values():
        folder.mkdir()
    save_keras(model, SPEC, folders["float"])
    save_fixed(model, SPEC, 8, folders["fixed8"])
    (folders["tflite"] / TFLITE_FILE).write_bytes(tflite.convert(model, "float32", []))
    write_spec(SPEC, folders["tflite"])
    return folders


TF = {"backend": "tensorflow"}


def test_a_tensorflow_node_of_another_architecture_is_refused(tf_nodes, tmp_path):
    folder = copy_node(tf_nodes["float"], tmp_path / "m", **TF, model="vgg16")
    said = f"{folder / NODE_FILE} says a tensorflow vgg16 float model (model.keras), but its spec "
    one_line_error(lambda: read_node(folder), said)


def test_a_keras_file_that_is_not_its_spec_s_model_is_refused(tf_nodes, tmp_path):
    from shrinkflow.backends.tensorflow.artifact import SPEC_FILE
    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras

    folder = copy_node(tf_nodes["float"], tmp_path / "m", **TF, model="vgg16")
    spec = json.loads((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "arch": "vgg16"}))
    read_node(folder)  # node.json and spec.json agree; the model file does not
    one_line_error(
        lambda: load_keras(folder),
        f"{folder / 'model.keras'}: holds a Keras model named 'resnet20', its spec says vgg16",
    )


def test_a_fixed_point_file_of_another_width_is_refused(tf_nodes, tmp_path):
    from shrinkflow.backends.tensorflow.artifact import load_fixed_point

    fields = {**TF, "stage": "quantized", "quant_method": "fixed_w4"}
    folder = copy_node(tf_nodes["fixed8"], tmp_path / "m", **fields)
    message = one_line_error(lambda: load_fixed_point(folder), f"{folder / NODE_FILE} says ")
    assert "4-bit fixed model (model.fixed.npz), but the model file is a tensorflow" in message


def test_a_tflite_file_of_another_architecture_is_refused(tf_nodes, tmp_path):
    from shrinkflow.backends.tensorflow import tflite
    from shrinkflow.backends.tensorflow.artifact import SPEC_FILE, TFLITE_FILE

    fields = {**TF, "model": "vgg16", "stage": "quantized", "quant_method": "float32"}
    folder = copy_node(tf_nodes["tflite"], tmp_path / "m", **fields)
    spec = json.loads((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "arch": "resnet32"}))
    one_line_error(
        lambda: tflite.interpreter(folder / TFLITE_FILE, threads=1),
        f"{folder / NODE_FILE} says a tensorflow vgg16 tflite model (model.tflite), but the "
        "model file is a tensorflow resnet32",
    )


def test_matching_tensorflow_nodes_load(tf_nodes, tmp_path):
    from shrinkflow.backends.tensorflow import tflite
    from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE
    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras

    quantized = {**TF, "stage": "quantized"}
    float_dir = copy_node(tf_nodes["float"], tmp_path / "f", **TF)
    fixed = copy_node(tf_nodes["fixed8"], tmp_path / "q", **quantized, quant_method="fixed_w8")
    lite = copy_node(tf_nodes["tflite"], tmp_path / "t", **quantized, quant_method="float32")
    for folder in (float_dir, fixed, lite):
        read_node(folder)
    assert load_keras(float_dir)[0].name == load_keras(fixed)[0].name == "resnet20"
    tflite.interpreter(lite / TFLITE_FILE, threads=1)


# ------------------------------------------------------------------------- the CLI route


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("data") / "prepared"
    write_prepared(
        folder,
        images=rng.integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
        labels=np.arange(30) % 10,
        splits={"train": np.arange(10), "val": np.arange(10, 20), "test": np.arange(20, 30)},
        classes=CLASSES,
        params={"dataset": "digits", "image_size": 8, "seed": 0, "val_fraction": 0.1,
                "test_fraction": 0.2},
    )  # fmt: skip
    return folder


def _damaged(source: Path, damage: str) -> bytes:
    good = source.read_bytes()
    if damage == "random":
        return np.random.default_rng(1).bytes(len(good))
    return good[: len(good) // 2]


def evaluate_in_process(project: Path, model_dir: Path, data: Path, monkeypatch, capsys):
    """``shrinkflow evaluate`` through cli.main() (argument parsing, params, the stage, the
    error handling), in this process: (exit status, stderr)."""
    monkeypatch.chdir(project)
    argv = ["shrinkflow", "evaluate", "--in", str(model_dir), "--data", str(data),
            "--out", str(project / "metrics.json")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


CASES = [
    ("node_empty", "float", None, "node.json", b""),
    ("node_garbage", "float", None, "node.json", b"\x00\x01 not json"),
    *[(f"pt_{d}", "float", BASELINE, "model.pt", d) for d in ("random", "truncated")],
    *[(f"pt2_{d}", "int8", {"stage": "quantized", "quant_method": "static_int8"}, "model.pt2", d)
      for d in ("random", "truncated")],
    *[(f"keras_{d}", "tf_float", TF, "model.keras", d) for d in ("random", "truncated")],
    # (a truncated .tflite passes the cheap checks: test_tf_evaluate covers its loader's line)
    ("tflite_random", "tf_tflite", {**TF, "stage": "quantized", "quant_method": "float32"},
     "model.tflite", "random"),
    *[(f"npz_{d}", "tf_fixed8", {**TF, "stage": "quantized", "quant_method": "fixed_w8"},
       "model.fixed.npz", d) for d in ("random", "truncated")],
]  # fmt: skip


@pytest.mark.parametrize(("source", "fields", "name", "damage"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_damaged_file_is_one_error_line_from_the_cli(
    torch_nodes, tf_nodes, prepared, tmp_path, monkeypatch, capsys, source, fields, name, damage
):
    sources = {**torch_nodes, **{f"tf_{k}": v for k, v in tf_nodes.items()}}
    folder = shutil.copytree(sources[source], tmp_path / "model")
    if fields is not None:
        node(folder, **fields)
    target = folder / name
    target.write_bytes(damage if isinstance(damage, bytes) else _damaged(target, damage))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    status, err = evaluate_in_process(tmp_path, folder, prepared, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {target}: "), err
    assert not (tmp_path / "metrics.json").exists()


def test_an_architecture_mismatch_fails_the_evaluate_cli(torch_nodes, prepared, tmp_path):
    """The whole route in a subprocess (as `dvc repro` runs it), through the loader's check."""
    folder = copy_node(torch_nodes["float"], tmp_path / "model", model="vgg16")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [SHRINKFLOW, "evaluate", "--in", str(folder), "--data", str(prepared), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {folder / NODE_FILE} says a torch vgg16 float model")
    assert not out.exists()
