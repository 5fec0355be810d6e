"""The TensorFlow DAG run for real through Snakemake and tracked in MLflow: the same stages,
files and lineage as the torch DAG (tests/test_pipeline_e2e.py), with tfmot and TFLite inside."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from projects import (
    BIN,
    make_project,
    mlflow_runs,
    read_params,
    read_summary,
    run,
    tool_env,
    write_params,
)
from stage_projects import prepare_digits, run_killed

# TFLite's full-integer quantization of every source. Fixed-point weights on TensorFlow (the
# file smaller, zeros kept, zero codes counted) are tests/test_tf_fixed_point.py's, and fixed_w4
# as a DAG job (quantize, then evaluate in a process of its own) runs in the torch DAGs: each
# more method here was 3 quantize and 3 evaluate jobs, each importing TensorFlow.
TINY_TF = {
    "backends": ["tensorflow"],
    "prune": {"methods": ["l1_unstructured", "gradual_polynomial"], "sparsities": [0.5]},
    "quantize": {"methods": ["static_int8"]},
    "sensitivity": {"ratios": [0.5]},
}
POINTS = [(m, "0.5") for m in TINY_TF["prune"]["methods"]]
QUANT = TINY_TF["quantize"]["methods"]
SOURCES = [("", ""), *POINTS]
MODELS = "results/models/tensorflow/resnet20/seed0"

pytestmark = pytest.mark.slow


def make_tf_project(dest: Path) -> Path:
    """The tiny project of tests/projects.py, switched to TensorFlow's methods."""
    project = make_project(dest, **{k: v for k, v in TINY_TF.items() if k != "backends"})
    params = read_params(project)
    params["backends"] = TINY_TF["backends"]
    # one epoch of 8x8 digits at batch 128 is ~10 steps: tfmot's default 100 would never fire
    params["prune"]["gradual"]["frequency"] = 1
    write_params(project, params)
    return project


@pytest.fixture(scope="module")
def tf_project(tmp_path_factory) -> Path:
    project = make_tf_project(tmp_path_factory.mktemp("tf"))
    run(
        [str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2"],
        project,
    )
    return project


@pytest.fixture(scope="module")
def prepared_digits(tmp_path_factory) -> Path:
    """The prepared data the tiny project trains on, made once in-process for the
    kill-and-resume test (the DAG run above runs download and prepare for real)."""
    return prepare_digits(tmp_path_factory.mktemp("prepared") / "digits")


def test_the_tensorflow_dag_writes_every_node_to_the_summary(tf_project):
    rows = read_summary(tf_project)
    keys = [(r["stage"], r["prune_method"], r["target_sparsity"], r["quant_method"]) for r in rows]
    assert keys == [
        ("baseline", "", "", ""),
        *[("finetuned", method, sparsity, "") for method, sparsity in POINTS],
        *[("quantized", method, sparsity, q) for method, sparsity in SOURCES for q in QUANT],
    ]
    assert {r["backend"] for r in rows} == {"tensorflow"}
    baseline = rows[0]
    assert float(baseline["top1"]) > 0.3  # two epochs on 8x8 digits; chance is 0.1
    keras_file = tf_project / baseline["artifact"] / "model.keras"
    assert int(baseline["size_bytes"]) == keras_file.stat().st_size
    assert int(baseline["params"]) == int(baseline["nonzero_params"]) > 0
    assert float(baseline["latency_ms_b1"]) > 0 and float(baseline["throughput_ips"]) > 0
    for row in rows[1 : 1 + len(POINTS)]:
        # counted in the saved file; the output layer stays dense, so a little under 0.5
        assert 0.45 < float(row["measured_sparsity"]) <= 0.5, row["prune_method"]
        assert int(row["params"]) == int(baseline["params"])
    float_rows = {
        (r["prune_method"], r["target_sparsity"]): r for r in rows if not r["quant_method"]
    }
    for row in rows[1 + len(POINTS) :]:
        source = float_rows[(row["prune_method"], row["target_sparsity"])]
        assert int(row["gzip_bytes"]) < int(source["gzip_bytes"])
        # int8 TFLite keeps a pruned model's zeros (and rounds a few small weights to zero)
        measured, kept = float(row["measured_sparsity"]), float(source["measured_sparsity"])
        assert measured >= kept - 1e-3
        assert measured == pytest.approx(kept, abs=0.03)
        assert float(row["top1"]) > 0.2
    static = next(r for r in rows if (r["quant_method"], r["prune_method"]) == ("static_int8", ""))
    assert (tf_project / static["artifact"] / "model.tflite").is_file()
    metrics = json.loads(
        (tf_project / MODELS / "quantized/static_int8/baseline/metrics.json").read_text()
    )
    assert metrics["reference_size_bytes"] == keras_file.stat().st_size
    assert (tf_project / MODELS / "sensitivity/sensitivity.csv").is_file()
    assert not list(tf_project.rglob(".tmp-*")), "a temporary output was left behind"


def test_every_tensorflow_job_is_an_mlflow_run_tagged_with_its_backend(tf_project):
    runs = mlflow_runs(tf_project)
    model_runs = [r for r in runs if r.data.tags["shrinkflow.stage"] not in
                  ("download", "prepare", "summarize", "report")]  # fmt: skip
    assert len(model_runs) == 2 + 2 * len(POINTS) + len(QUANT) * len(SOURCES) * 2 + len(SOURCES)
    assert {r.data.tags["shrinkflow.backend"] for r in model_runs} == {"tensorflow"}
    assert all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    # evaluate -> quantize -> finetune -> prune -> train: the lineage of a quantized sweep point
    evaluate = next(
        r
        for r in runs
        if r.data.tags["shrinkflow.stage"] == "evaluate"
        and r.data.tags.get("shrinkflow.qmethod") == "static_int8"
        and r.data.tags.get("shrinkflow.method") == "gradual_polynomial"
    )
    chain = [evaluate]
    while "shrinkflow.source_run_id" in chain[-1].data.tags:
        chain.append(by_id[chain[-1].data.tags["shrinkflow.source_run_id"]])
    assert [r.data.tags["shrinkflow.stage"] for r in chain] == [
        "evaluate", "quantize", "finetune", "prune", "train", "prepare", "download",
    ]  # fmt: skip
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tf_project / 'mlflow.db'}")
    prune = chain[3]
    sparsity = [m.value for m in client.get_metric_history(prune.info.run_id, "sparsity")]
    assert sparsity and sparsity[-1] == pytest.approx(0.5, abs=0.01)  # tfmot's schedule, logged
    train = chain[4]
    assert [m.step for m in client.get_metric_history(train.info.run_id, "val_top1")] == [1, 2]
    assert "model/model.keras" in {
        a.path for a in client.list_artifacts(train.info.run_id, "model")
    }


def test_a_killed_tensorflow_train_job_resumes_in_the_same_mlflow_run(tmp_path, prepared_digits):
    """TensorFlow's `shrinkflow train` killed outright (SIGKILL) once it saved epoch 1's resume
    state: the re-run resumes at epoch 2 (the last) and continues the same MLflow run (each
    epoch once)."""
    project = make_tf_project(tmp_path / "project")
    shutil.copytree(prepared_digits, project / "data/prepared/digits")
    epochs = 2
    out = project / MODELS / "baseline/model"
    train = ["train", "--set", f"train.epochs={epochs}", "--backend", "tensorflow",
             "--model", "resnet20", "--in", "data/prepared/digits", "--out", str(out)]  # fmt: skip
    run_killed(project, train, tmp_path / "bin", kill_after=("state.json", 1))
    state = json.loads((out.parent / "resume/state.json").read_text())
    assert state["epoch"] == 1 and not out.exists()

    resumed = run([str(BIN / "shrinkflow"), *train], project)
    assert f"resuming from epoch 2/{epochs}" in resumed.stderr
    runs = [r for r in mlflow_runs(project) if r.data.tags["shrinkflow.stage"] == "train"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1")]
    assert sorted(steps) == list(range(1, epochs + 1))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--method", "gradual_polynomial", "--sparsity", "0.5",
          "--sensitivity", f"{MODELS}/sensitivity", "--set", "prune.gradual.frequency=1000"],
         "error: prune.gradual.frequency: 1000 steps never reaches the target"),
        (["quantize", "--method", "static_int8", "--set", "quantize.calibration_batches=0"],
         "error: quantize.calibration_batches: 0 is not in [1, 1000]"),
        (["quantize", "--method", "float8"],
         "error: --method: 'float8' is not a quantization method (allowed: "),
    ],
)  # fmt: skip
def test_bad_tensorflow_input_is_one_line_and_writes_nothing(tf_project, args, message):
    """An unreachable tfmot schedule (found in the job, so its MLflow run ends FAILED), an empty
    representative data set and an unknown TFLite mode (refused before any run starts)."""
    out = tf_project / "results/refused/model"
    result = subprocess.run(
        [str(BIN / "shrinkflow"), *args, "--in", f"{MODELS}/baseline/model",
         "--data", "data/prepared/digits", "--out", str(out)],
        cwd=tf_project, env=tool_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith(message), errors[0]
    # no model folder and no temporary one (the empty resume folder beside it is the scratch
    # state a prune job creates before it starts; .dvcignore keeps it out of DVC)
    assert not out.exists() and not list(out.parent.glob(".tmp-*"))
    assert all(r.info.status in ("FINISHED", "FAILED") for r in mlflow_runs(tf_project))
