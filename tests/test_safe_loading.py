"""Opening a model file never runs code from it, whatever the format and wherever in the file
a payload hides.

Every test plants a payload that would create a marker file when unpickled, evaluated or run,
in one place a format can hide it, loads the file the way shrinkflow does, and checks that the
load is refused with one line naming the file and that the marker never appears. A refusal
must not depend on the payload failing: each payload works (``test_the_payload_works``).
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from artifact_fixtures import SPEC
from torch import nn

from shrinkflow.backends.torch import evaluate as torch_evaluate
from shrinkflow.backends.torch import pt2e, pt2e_archive
from shrinkflow.backends.torch.artifact import FORMAT, MODEL_FILE, load_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.errors import ShrinkflowError


def marker_code(marker: Path) -> str:
    """Python that creates ``marker`` (double quotes only: it is embedded in generated code)."""
    return f'open("{marker}", "w").close()'


class Payload:
    """Unpickling it runs ``exec(code)``: the classic pickle payload."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


def refused(load: Callable[[], object], path: Path, marker: Path) -> str:
    """Run ``load``; it must raise one ShrinkflowError line naming ``path``, marker unmade."""
    try:
        load()
    except Exception as e:  # checked below, after the marker
        error: Exception | None = e
    else:
        error = None
    assert not marker.exists(), "the payload ran"
    assert error is not None, "the file loaded"
    assert isinstance(error, ShrinkflowError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def test_the_payload_works(marker):
    pickle.loads(pickle.dumps(Payload(marker_code(marker))))
    assert marker.exists()


# ---------------------------------------------------------------- torch: model.pt, state.pt


@pytest.fixture(scope="module")
def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 10, in_channels=1, image_size=8)


def test_a_pickled_object_in_model_pt_is_refused(tiny_resnet, tmp_path, marker):
    state = {k: v.detach() for k, v in tiny_resnet.state_dict().items()}
    payload = {
        "format": FORMAT,
        "spec": SPEC,
        "state_dict": state,
        "x": Payload(marker_code(marker)),
    }
    torch.save(payload, tmp_path / MODEL_FILE)  # data.pkl now calls exec
    message = refused(lambda: load_model(tmp_path), tmp_path / MODEL_FILE, marker)
    assert "refusing" in message and "exec" in message


def test_a_bare_pickle_named_model_pt_is_refused(tmp_path, marker):
    (tmp_path / MODEL_FILE).write_bytes(pickle.dumps({"x": Payload(marker_code(marker))}))
    refused(lambda: load_model(tmp_path), tmp_path / MODEL_FILE, marker)


def test_a_pickled_object_in_the_resume_state_is_ignored(tmp_path, marker, capsys):
    from shrinkflow.backends.torch import resume_state
    from shrinkflow.training.resume import matching_state

    path = tmp_path / resume_state.STATE_FILE
    state = {
        "format": resume_state.STATE_FORMAT,
        "fingerprint": "f",
        "x": Payload(marker_code(marker)),
    }
    torch.save(state, path)
    assert matching_state(resume_state.StateFile(tmp_path), "f") is None
    assert not marker.exists()
    said = capsys.readouterr().err
    assert f"{path}: refusing to load" in said and "starting over" in said
    assert not path.exists()  # never resumed by a later run either


# ---------------------------------------------------------------- torch: model.pt2


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def good_pt2(tmp_path_factory) -> Path:
    """A real int8 program (PT2E static) of a tiny conv + linear model."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pt2")
    prepared = pt2e.prepare(_Tiny().eval(), SPEC, "static")
    pt2e.calibrate(prepared, [torch.randn(4, 1, 8, 8)])
    pt2e_archive.save(pt2e.convert(prepared), SPEC, folder)
    return folder / pt2e_archive.PT2_FILE


def rewrite(source: Path, target: Path, change: Callable[[dict[str, bytes]], None]) -> None:
    """Copy the zip ``source`` to ``target`` after ``change`` edited its {member: bytes}."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _edit_json(members: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    value = json.loads(members[name])
    edit(value)
    members[name] = json.dumps(value).encode()


ROOT = "model/"


def sample_inputs(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # unpickled by torch.export, which retries with weights_only=False
        m[ROOT + "data/sample_inputs/model.pt"] = saved(((Payload(code),), {}))

    return change


def pickled_weight(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # a weight flagged use_pickle: torch.load(weights_only=False)
        config = ROOT + "data/weights/model_weights_config.json"
        first = next(iter(json.loads(m[config])["config"].values()))["path_name"]
        _edit_json(
            m,
            config,
            lambda c: [e.update(use_pickle=e["path_name"] == first) for e in c["config"].values()],
        )
        m[ROOT + "data/weights/" + first] = saved(Payload(code))

    return change


def pickled_constant(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # a pickled tensor constant: torch.load(weights_only=False)
        entry = {"path_name": "tensor_0", "is_param": False, "use_pickle": True}
        config = ROOT + "data/constants/model_constants_config.json"
        _edit_json(m, config, lambda c: c["config"].update(c0={**entry, "tensor_meta": None}))
        m[ROOT + "data/constants/tensor_0"] = saved(Payload(code))

    return change


def opaque_object(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # an opaque constant object: pickle.loads
        entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True}
        config = ROOT + "data/constants/model_constants_config.json"
        _edit_json(m, config, lambda c: c["config"].update(o0={**entry, "tensor_meta": None}))
        m[ROOT + "data/constants/opaque_obj_0"] = pickle.dumps(Payload(code))

    return change


def legacy_weights(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # the pre-2.8 weights file, unpickled with the weights_only=False fallback
        m[ROOT + "data/weights/model.pt"] = saved({"w": Payload(code)})

    return change


def old_format(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # torch 2.7's layout, tried when the archive is not a current one
        program = m[ROOT + "models/model.json"]
        m.clear()
        m["version"] = b"8.20"
        m["serialized_exported_program.json"] = program
        m["serialized_state_dict.pt"] = saved({"w": Payload(code)})
        m["serialized_constants.pt"] = saved({})
        m["serialized_example_inputs.pt"] = saved(((torch.zeros(2, 1, 8, 8),), {}))

    return change


def guard(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # guards become Python source, run by program.module() on every call
        # No double quotes: the guard is also pasted into a double-quoted message string.
        payload = f"__import__('builtins').exec(bytes.fromhex('{code.encode().hex()}')) is None"
        _edit_json(m, ROOT + "models/model.json", lambda p: p.update(guards_code=[payload]))

    return change


def shape_expression(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # shape expressions go through sympy.sympify, which evals them
        text = m[ROOT + "models/model.json"].decode()
        evil = f"__import__('builtins').exec({code!r})"
        escaped = json.dumps(evil)[1:-1]
        m[ROOT + "models/model.json"] = text.replace("Symbol(", f"{escaped} or Symbol(").encode()

    return change


def call_target(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # targets resolve by attribute path from torch: any callable torch reaches
        text = m[ROOT + "models/model.json"].decode()
        m[ROOT + "models/model.json"] = text.replace(
            '"torch.ops.aten.relu.default"', '"torch.serialization.os.system"'
        ).encode()

    return change


def aoti_library(code: str) -> Callable[[dict[str, bytes]], None]:
    def change(m):  # AOTInductor packages are shared libraries that torch loads
        m[ROOT + "data/aotinductor/model/model.so"] = b"\x7fELF" + bytes(64)

    return change


PLANTS = [
    sample_inputs,
    pickled_weight,
    pickled_constant,
    opaque_object,
    legacy_weights,
    old_format,
    guard,
    shape_expression,
    call_target,
    aoti_library,
]


@pytest.mark.parametrize("plant", PLANTS, ids=[p.__name__ for p in PLANTS])
def test_a_payload_in_a_pt2_archive_is_refused(good_pt2, tmp_path, marker, plant):
    rewrite(good_pt2, tmp_path / pt2e_archive.PT2_FILE, plant(marker_code(marker)))
    # load_subject loads the program and runs it once (MACs), as evaluate does
    refused(
        lambda: torch_evaluate.load_subject(tmp_path, torch.device("cpu")),
        tmp_path / pt2e_archive.PT2_FILE,
        marker,
    )


def test_the_unaltered_archive_loads_and_runs(good_pt2):
    subject = torch_evaluate.load_subject(good_pt2.parent, torch.device("cpu"))
    assert subject.macs > 0 and subject.spec == SPEC


@pytest.mark.parametrize("damage", ["random", "truncated", "empty"])
def test_a_damaged_pt2_is_one_line_without_torch_log(good_pt2, tmp_path, capfd, damage):
    good = good_pt2.read_bytes()
    data = {"random": np.random.default_rng(0).bytes(4096), "truncated": good[: len(good) // 2]}
    (tmp_path / pt2e_archive.PT2_FILE).write_bytes(data.get(damage, b""))
    refused(
        lambda: pt2e_archive.load(tmp_path), tmp_path / pt2e_archive.PT2_FILE, tmp_path / "unused"
    )
    assert capfd.readouterr().err == ""


# ---------------------------------------------------------------- TensorFlow


@pytest.fixture(scope="module")
def tf_parts(tmp_path_factory):
    """A tiny untrained Keras resnet20 saved as a float node and as a fixed-point node."""
    import tf_keras as keras  # noqa: F401  (TensorFlow after torch: see conftest)

    from shrinkflow.backends.tensorflow.artifact import save_fixed_point
    from shrinkflow.backends.tensorflow.artifact import save_model as save_keras
    from shrinkflow.backends.tensorflow.models import create_model as create_keras

    model = create_keras("resnet20", 10, in_channels=1, image_size=8, mean=[0.4], std=[0.3])
    root = tmp_path_factory.mktemp("tf")
    (root / "float").mkdir()
    (root / "fixed").mkdir()
    save_keras(model, SPEC, root / "float")
    save_fixed_point(model, SPEC, 8, root / "fixed")
    return root


def _copy_spec(source: Path, target: Path) -> None:
    (target / "spec.json").write_bytes((source / "spec.json").read_bytes())


def _lambda_model(marker: Path):
    """A model whose Lambda layer creates ``marker`` when called (building the model calls it:
    the marker is removed again, so that only a load can make it)."""
    import tf_keras as keras

    code = marker_code(marker)
    inputs = keras.Input((8, 8, 1), name="pixels")
    # A real lambda: saved as marshalled bytecode, which deserializing runs.
    outputs = keras.layers.Lambda(lambda x: (exec(code), x)[1])(inputs)
    model = keras.Model(inputs, outputs, name="resnet20")
    marker.unlink()
    return model


def test_an_hdf5_file_named_model_keras_is_refused(tf_parts, tmp_path, marker):
    """tf_keras loads a legacy HDF5 file whatever its name, and ignores safe_mode for it."""
    from shrinkflow.backends.tensorflow.artifact import KERAS_FILE
    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras

    h5 = tmp_path / "model.h5"
    _lambda_model(marker).save(h5)
    h5.rename(tmp_path / KERAS_FILE)
    _copy_spec(tf_parts / "float", tmp_path)
    refused(lambda: load_keras(tmp_path), tmp_path / KERAS_FILE, marker)


def test_a_lambda_layer_in_model_keras_is_refused(tf_parts, tmp_path, marker):
    from shrinkflow.backends.tensorflow.artifact import KERAS_FILE
    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras

    _lambda_model(marker).save(tmp_path / KERAS_FILE)
    _copy_spec(tf_parts / "float", tmp_path)
    refused(lambda: load_keras(tmp_path), tmp_path / KERAS_FILE, marker)


def _swap_first(config: dict, class_name: str, **extra) -> None:
    """Make the first ReLU layer of a Keras config another class (in place)."""
    layers = config["config"]["layers"]
    layer = next(layer for layer in layers if layer["class_name"] == "ReLU")
    layer.update(class_name=class_name, **extra)


@pytest.mark.parametrize(
    "edit",
    [
        {"class_name": "TFOpLambda"},  # calls any TensorFlow function by name (tf.io.write_file)
        {"class_name": "system", "module": "os"},  # Keras imports the module it is told to
        {"class_name": "ReLU", "registered_name": "Custom>Anything"},
    ],
    ids=["tf_op_lambda", "foreign_module", "registered_name"],
)
def test_a_foreign_class_in_model_keras_is_refused(tf_parts, tmp_path, marker, edit):
    from shrinkflow.backends.tensorflow.artifact import KERAS_FILE
    from shrinkflow.backends.tensorflow.artifact import load_model as load_keras

    rewrite(
        tf_parts / "float" / KERAS_FILE,
        tmp_path / KERAS_FILE,
        lambda m: _edit_json(m, "config.json", lambda c: _swap_first(c, **edit)),
    )
    _copy_spec(tf_parts / "float", tmp_path)
    message = refused(lambda: load_keras(tmp_path), tmp_path / KERAS_FILE, marker)
    assert "refusing" in message


def test_an_object_array_in_a_fixed_point_file_is_refused(tf_parts, tmp_path, marker):
    from shrinkflow.backends.tensorflow.artifact import FIXED_FILE, load_fixed_point

    with np.load(tf_parts / "fixed" / FIXED_FILE) as archive:
        arrays = {k: archive[k] for k in archive.files}
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker_code(marker))
    arrays["w0.value"] = evil  # an object array is a pickle inside the .npy
    np.savez(tmp_path / FIXED_FILE, **arrays)
    _copy_spec(tf_parts / "fixed", tmp_path)
    refused(lambda: load_fixed_point(tmp_path), tmp_path / FIXED_FILE, marker)


def test_a_lambda_in_a_fixed_point_architecture_is_refused(tf_parts, tmp_path, marker):
    from shrinkflow.backends.tensorflow.artifact import FIXED_FILE, load_fixed_point

    with np.load(tf_parts / "fixed" / FIXED_FILE) as archive:
        arrays = {k: archive[k] for k in archive.files}
    arrays["architecture"] = np.array(_lambda_model(marker).to_json().encode())
    np.savez(tmp_path / FIXED_FILE, **arrays)
    _copy_spec(tf_parts / "fixed", tmp_path)
    refused(lambda: load_fixed_point(tmp_path), tmp_path / FIXED_FILE, marker)


def test_a_select_tensorflow_op_in_a_tflite_file_is_refused(tmp_path, marker):
    """A Select-TensorFlow op (here WriteFile) would run wherever the Flex delegate is linked."""
    import tensorflow as tf

    from shrinkflow.backends.tensorflow import tflite

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def forward(x):
        tf.io.write_file(str(marker), tf.strings.as_string(x[0, 0]))
        return x * 2.0

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], forward
    )
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    path = tmp_path / "model.tflite"
    path.write_bytes(converter.convert())
    message = refused(lambda: tflite.interpreter(path, threads=1), path, marker)
    assert "refusing op 'Flex" in message


# ---------------------------------------------------------------- prepared data


def test_an_object_array_in_prepared_data_is_refused(tmp_path, marker):
    """Prepared arrays are checksummed, but a planted folder can carry matching checksums."""
    from shrinkflow.data import prepared as p

    folder = tmp_path / "prepared"
    params = {"dataset": "digits", "image_size": 8, "seed": 0, "val_fraction": 0.1,
              "test_fraction": 0.2}  # fmt: skip
    p.write_prepared(
        folder,
        images=np.zeros((6, 8, 8, 1), dtype=np.uint8),
        labels=np.arange(6) % 2,
        splits={"train": np.arange(2), "val": np.arange(2, 4), "test": np.arange(4, 6)},
        classes=["0", "1"],
        params=params,
    )
    evil = np.empty(6, dtype=object)
    evil[0] = Payload(marker_code(marker))
    np.save(folder / p.IMAGES, evil, allow_pickle=True)
    manifest = json.loads((folder / p.MANIFEST).read_text())
    manifest["files"][p.IMAGES] = p.sha256_file(folder / p.IMAGES)
    manifest["fingerprint"] = p.fingerprint(manifest["files"], params)
    (folder / p.MANIFEST).write_text(json.dumps(manifest))
    refused(lambda: p.load_prepared(folder), folder, marker)
