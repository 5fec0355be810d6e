"""The registered models load through MLflow's standard API and predict, one registered name
per backend with the aliases on the report's choice; a SQLite store moved to another folder
still opens with its artefacts (``tracking.relocate``).

Tiny untrained 8x8 one-channel ResNet-20s (``artifact_fixtures.SPEC``): a torch state dict and
a TFLite float32 conversion of a Keras model, each logged by a run as a pipeline stage logs it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from artifact_fixtures import SPEC  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from torch_fixtures import fixed_threads  # noqa: E402, F401  (one torch thread)

from shrinkflow.nodes import NODE_FILE  # noqa: E402
from shrinkflow.tracking import job_run, register_model  # noqa: E402
from shrinkflow.tracking.relocate import relocate  # noqa: E402
from shrinkflow.tracking.store import open_store  # noqa: E402

NAME = "tiny"


def make_cfg(folder: Path) -> dict:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return {"seed": 0, "tracking": {"experiment": "test", "uri": uri}}


@pytest.fixture
def project(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a fresh store (mlflow.db, mlartifacts/ beside it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    return folder


def logged_node(cfg: dict, folder: Path, node: dict) -> str:
    """Label ``folder`` with ``node``, log it as its run's ``model`` artefact; the run id."""
    (folder / NODE_FILE).write_text(json.dumps({"model": "resnet20", "seed": 0, **node}))
    with job_run(cfg, node["stage"], out=folder) as job:
        job.log_artifact(folder)
    return job.run_id


def torch_node(cfg: dict, folder: Path) -> tuple[str, torch.nn.Module]:
    from shrinkflow.backends.torch.artifact import save_model
    from shrinkflow.backends.torch.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8).eval()
    folder.mkdir(parents=True)
    save_model(model, SPEC, folder)
    return logged_node(cfg, folder, {"backend": "torch", "stage": "baseline"}), model


def tflite_node(cfg: dict, folder: Path):
    import tf_keras as keras

    from shrinkflow.backends.tensorflow import tflite
    from shrinkflow.backends.tensorflow.artifact import TFLITE_FILE, write_spec
    from shrinkflow.backends.tensorflow.models import create_model

    keras.utils.set_random_seed(0)
    model = create_model("resnet20", 10, 1, 8, SPEC["mean"], SPEC["std"])
    folder.mkdir(parents=True)
    (folder / TFLITE_FILE).write_bytes(tflite.convert(model, "float32", []))
    write_spec(SPEC, folder)
    node = {"backend": "tensorflow", "stage": "quantized", "quant_method": "float32"}
    return logged_node(cfg, folder, node), model


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def test_each_backend_registers_a_pyfunc_that_loads_and_predicts_after_the_store_moved(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(project)
    torch_run, torch_model = torch_node(cfg, tmp_path / "nodes/torch/model")
    tf_run, keras_model = tflite_node(cfg, tmp_path / "nodes/tensorflow/model")

    tags = {"shrinkflow.label": "x"}
    # the store named by $MLFLOW_TRACKING_URI, as under Snakemake: registering leaves it set
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg["tracking"]["uri"])
    by_env = {**cfg, "tracking": {**cfg["tracking"], "uri": None}}
    assert register_model(by_env, NAME, torch_run, ["champion"], tags, "first") == (
        "tiny-torch",
        "1",
    )
    assert os.environ["MLFLOW_TRACKING_URI"] == cfg["tracking"]["uri"]
    assert register_model(by_env, NAME, tf_run, ["champion"], tags, "then") == (
        "tiny-tensorflow",
        "1",
    )
    # the same run again: the same version; the alias stays on the newest choice
    assert register_model(cfg, NAME, tf_run, ["champion", "fastest"], tags, "again")[1] == "1"
    client = MlflowClient(cfg["tracking"]["uri"])
    assert aliases(client, "tiny-tensorflow") == {"champion": 1, "fastest": 1}
    assert aliases(client, "tiny-torch") == {}  # the champion moved to the other backend
    version = client.get_model_version("tiny-tensorflow", "1")
    assert version.run_id == tf_run and version.description == "again"
    assert version.tags["shrinkflow.label"] == "x"
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == tf_run and logged.status == "READY"

    moved = tmp_path / "elsewhere" / "project"
    moved.parent.mkdir()
    shutil.move(project, moved)
    cfg = make_cfg(moved)
    client, _ = open_store(cfg)  # relocates the store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg["tracking"]["uri"])

    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}-tensorflow@champion")
    reference = keras_model(images.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(loaded.predict(images), reference, rtol=1e-4, atol=1e-4)
    info = mlflow.models.get_model_info(f"models:/{NAME}-tensorflow@champion")
    assert info.signature.inputs.inputs[0].shape == (-1, 8, 8, 1)
    assert info.metadata["classes"] == SPEC["classes"]

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}-torch/1")
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        reference = torch_model((pixels - SPEC["mean"][0]) / SPEC["std"][0]).numpy()
    out = loaded.predict(images)
    assert out.shape == (5, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        loaded.predict(images[:, :4])  # the signature's shape is enforced
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}-torch/1"))
    assert not list(model_dir.rglob("*.pkl")), "the pyfunc is logged as code, not pickled"


def test_a_moved_store_opens_with_its_artefacts_and_an_unmoved_one_is_left_alone(
    project: Path, tmp_path: Path
) -> None:
    cfg = make_cfg(project)
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w")
    with job_run(cfg, "train", out=folder) as job:
        job.log_artifact(folder)
    db = project / "mlflow.db"
    assert relocate(db) == []  # where it was made: nothing to do
    before = db.read_bytes()
    assert relocate(db) == [] and db.read_bytes() == before

    moved = tmp_path / "copy"
    shutil.copytree(project, moved)
    shutil.rmtree(project)  # nothing may still be read from the old folder
    assert relocate(moved / "mlflow.db") == [project.as_uri()]
    client, _ = open_store(make_cfg(moved))
    run = client.get_run(job.run_id)
    assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri() + "/")
    got = client.download_artifacts(job.run_id, "node/weights.bin", str(tmp_path))
    assert Path(got).read_bytes() == b"w"
    with sqlite3.connect(moved / "mlflow.db") as conn:
        locations = conn.execute("SELECT artifact_location FROM experiments").fetchall()
    assert not [loc for (loc,) in locations if project.as_uri() in (loc or "")]
