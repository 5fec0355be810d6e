"""The MLflow UI's door: what its run list and Compare view fetch from a sweep shrinkflow logged.

A few artefacts go through the real stage code (``model_job`` for the jobs that write them, the
``evaluate`` stage for their rows) with the backends' measuring stood in by a fixed set of
numbers under the names both backends' ``evaluate_model`` return (pinned by
tests/test_torch_evaluate.py and tests/test_tf_evaluate.py), into a SQLite store. MLflow's
server app (``mlflow.server.app``, the handlers ``mlflow server`` and ``mlflow ui`` serve) then
answers the UI's own AJAX search, posted as the experiment page posts it. It runs in a process
of its own under Flask's server: one import of MLflow's server, where ``mlflow server`` pays for
three (its CLI, uvicorn, the worker), ~30 s on two busy cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import wait_for

from shrinkflow import dag
from shrinkflow.stages import evaluate
from shrinkflow.stages.model_job import model_job
from shrinkflow.tracking import prepare_store
from shrinkflow.tracking.health import server_problem
from shrinkflow.tracking.server import free_port

EXPERIMENT = "sweep"
# The sweep's axes, params of every artefact run, and the headline measurements, metrics of every
# artefact run under these names: what a user puts on the Compare view's axes.
AXES = {"backend", "model", "stage", "prune_method", "target_sparsity", "quant_method", "seed"}
AXES |= {"dataset"}
HEADLINE = {"val_top1", "top1", "top5", "size_bytes", "gzip_bytes", "nominal_bytes"}
HEADLINE |= {"sparse_bytes", "sparse_gzip_bytes", "latency_ms_b1", "throughput_ips"}
HEADLINE |= {"measured_sparsity", "peak_mem_mb", "params", "nonzero_params", "macs"}

BASELINE = dag.baseline("torch", "resnet20", 0)
POINTS = [dag.finetuned("torch", "resnet20", "l1_unstructured", s, 0) for s in (0.5, 0.8)]
NODES = [
    BASELINE,
    *POINTS,
    dag.quantized("torch", "resnet20", "fixed_w4", BASELINE),
    dag.quantized("torch", "resnet20", "fixed_w8", POINTS[1]),
]
NAMES = [
    "torch/resnet20 baseline seed0",
    "torch/resnet20 l1_unstructured 0.5 seed0",
    "torch/resnet20 l1_unstructured 0.8 seed0",
    "torch/resnet20 baseline fixed_w4 seed0",
    "torch/resnet20 l1_unstructured 0.8 fixed_w8 seed0",
]
WEIGHTS = 1000  # the baseline's prunable weights in the stand-in measurements


def record(node: dag.Node) -> dict:
    """``node.json`` as the stages write it: empty fields left out."""
    fields = {
        "backend": node.backend,
        "model": node.model,
        "stage": node.stage,
        "seed": node.seed,
        "prune_method": node.prune_method,
        "target_sparsity": node.target_sparsity,
        "quant_method": node.quant_method,
    }
    if node.stage != "baseline":
        fields["reference_prunable_weights"] = WEIGHTS
    return {k: v for k, v in fields.items() if v not in ("", None)}


def measured(cfg: dict, model_dir: Path, data: object, reference_dir: Path | None) -> dict:
    """What ``evaluate_model`` returns, its numbers made up from the node (measuring is not what
    this module tests): the keys both backends return, and for a quantized node the reference's."""
    node = dag.Node.from_record(json.loads((model_dir / "node.json").read_text()))
    kept = round(WEIGHTS * (1 - (node.target_sparsity or 0.0)))
    bits = {"fixed_w4": 4, "fixed_w8": 8}.get(node.quant_method, 32)
    result = {
        "top1": 0.9 - (node.target_sparsity or 0.0) / 10 - (32 - bits) / 1000,
        "val_top1": 0.91 - (node.target_sparsity or 0.0) / 10,
        "top5": 0.99,
        "test_images": 360,
        "val_images": 180,
        "params": WEIGHTS + 50,
        "nonzero_params": kept + 50,
        "prunable_weights": WEIGHTS,
        "prunable_nonzero": kept,
        "layer_sparsity": [],
        "measured_sparsity": 1 - kept / WEIGHTS,
        "macs": 40_000,
        "size_bytes": 4000 * bits // 32 + 300,
        "gzip_bytes": (kept * bits) // 8 + 200,
        "nominal_bytes": (kept * bits) // 8,
        "sparse_bytes": (kept * bits) // 8 + WEIGHTS // 8,
        "sparse_gzip_bytes": (kept * bits) // 8 + 100,
        "latency_ms_b1": 1.0 + bits / 32,
        "latency_ms_b1_p90": 1.2 + bits / 32,
        "latency_batch": 1,
        "throughput_ips": 1000.0 / (1.0 + bits / 32),
        "throughput_batch": 32,
        "peak_mem_mb": 120.0,
        "peak_mem_method": "rss_high_water_mark",
        "threads": 1,
        "device": "cpu",
        "runtime": "torch",
    }
    if reference_dir is not None:
        result.update(float_latency_ms_b1=2.0, speedup_b1=2.0 / result["latency_ms_b1"])
    return result


def write_model(job_folder: Path) -> None:
    with zipfile.ZipFile(job_folder / "model.pt", "w") as archive:  # read_node checks the zip
        archive.writestr("model/data.pkl", b"weights")


def log_sweep(root: Path, cfg: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each node's chain of jobs (train; prune, finetune; quantize), then its evaluation."""
    monkeypatch.chdir(root)
    monkeypatch.setattr(evaluate, "backend_module", lambda backend, job: types.SimpleNamespace(
        evaluate_model=measured))  # fmt: skip
    monkeypatch.setattr(evaluate, "load_prepared", lambda folder: None)
    prepared = root / "prepared"
    prepared.mkdir()

    def write(stage: str, node: dag.Node, parent: Path) -> None:
        with model_job(cfg, stage, record(node), node.model_dir, parent) as job:
            write_model(job.staging)
            job.facts = {"seconds": 1.0}

    write("train", BASELINE, prepared)
    for point in POINTS:
        pruned = dag.pruned("torch", "resnet20", point.prune_method, point.target_sparsity, 0)
        write("prune", pruned, BASELINE.model_dir)
        write("finetune", point, pruned.model_dir)
    for node in NODES:
        if node.stage == "quantized":
            write("quantize", node, node.source.model_dir)
        reference = node.source.model_dir if node.stage == "quantized" else None
        evaluate.run(cfg, node.model_dir, prepared, node.metrics, reference)


class UI:
    """The MLflow server the UI talks to, asked what the experiment page asks."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def ajax(self, endpoint: str, body: dict | None = None, **query: str) -> dict:
        url = f"{self.uri}/ajax-api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def experiment(self, name: str) -> dict:
        return self.ajax("experiments/get-by-name", experiment_name=name)["experiment"]

    def run_list(self, name: str, **body: object) -> list[dict]:
        """The experiment page's search: the body the run list (and the Compare view on the
        runs it shows) sends."""
        body = {
            "experiment_ids": [self.experiment(name)["experiment_id"]],
            "filter": "",
            "run_view_type": "ACTIVE_ONLY",
            "max_results": 100,
            "order_by": ["attributes.start_time DESC"],
            **body,
        }
        return self.ajax("runs/search", body).get("runs", [])


# MLflow's server app on 127.0.0.1:PORT with the store and artifact root `mlflow server` hands
# its workers in these variables (read on the first request).
SERVE = """
import os, sys
from mlflow.server import ARTIFACT_ROOT_ENV_VAR, BACKEND_STORE_URI_ENV_VAR, app
port, os.environ[BACKEND_STORE_URI_ENV_VAR], os.environ[ARTIFACT_ROOT_ENV_VAR] = sys.argv[1:]
app.run(host="127.0.0.1", port=int(port))
"""


def serve(store_uri: str, artifacts: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SERVE, str(port), store_uri, str(artifacts)],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    root = tmp_path_factory.mktemp("compare")
    db = root / "mlflow.db"
    cfg = {
        "seed": 0,
        "data": {"name": "digits", "image_size": 8},
        "evaluate": {"batch_sizes": [1, 32]},
        "tracking": {"experiment": EXPERIMENT, "uri": f"sqlite:///{db}"},
    }
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        prepare_store(cfg)
        log_sweep(root, cfg, monkeypatch)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = serve(cfg["tracking"]["uri"], root / "mlartifacts", port)
    try:
        wait_for(lambda: server.poll() is not None or server_problem(uri) is None, 120, uri)
        assert server.poll() is None, f"MLflow's server exited with status {server.returncode}"
        yield UI(uri)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def values(entries: list[dict] | None) -> dict[str, object]:
    return {e["key"]: e["value"] for e in entries or []}


def test_the_run_list_is_one_named_row_per_artefact(ui: UI) -> None:
    runs = ui.run_list(EXPERIMENT)
    assert sorted(r["info"]["run_name"] for r in runs) == sorted(NAMES)
    for run in runs:
        tags = values(run["data"].get("tags"))
        assert tags["shrinkflow.stage"] == "evaluate"
        # flat: nothing folds a row under another, and lineage is still there to follow
        assert "mlflow.parentRunId" not in tags
        assert tags["shrinkflow.source_run_id"] in tags["mlflow.note.content"]
    # The experiment opens on the model-training view (runs, charts), not on GenAI traces.
    experiment = values(ui.experiment(EXPERIMENT)["tags"])
    assert experiment["mlflow.experimentKind"] == "custom_model_development"


def test_every_row_has_the_axes_as_params_and_the_headline_metrics(ui: UI) -> None:
    runs = {r["info"]["run_name"]: r for r in ui.run_list(EXPERIMENT)}
    for name, node in zip(NAMES, NODES, strict=True):
        params = values(runs[name]["data"].get("params"))
        assert set(params) == AXES, name  # the axes only: no 50 global params to wade through
        metrics = values(runs[name]["data"].get("metrics"))
        assert set(metrics) >= HEADLINE, (name, HEADLINE - set(metrics))
        assert params["target_sparsity"] == str(node.target_sparsity or 0.0)
        assert params["quant_method"] == (node.quant_method or "none")
        assert metrics["measured_sparsity"] == pytest.approx(node.target_sparsity or 0.0)


def test_the_search_filters_the_sweep_by_its_params(ui: UI) -> None:
    """What a user types in the run list's search box, and sorting by a headline metric."""
    found = ui.run_list(
        EXPERIMENT,
        filter="params.prune_method = 'l1_unstructured' and metrics.top1 > 0.5",
        order_by=["metrics.gzip_bytes ASC"],
    )
    names = [r["info"]["run_name"] for r in found]
    assert set(names) == {n for n in NAMES if "l1_unstructured" in n}
    sizes = [values(r["data"]["metrics"])["gzip_bytes"] for r in found]
    assert sizes == sorted(sizes)


def test_the_jobs_are_flat_named_runs_linked_to_their_sources(ui: UI) -> None:
    jobs = {r["info"]["run_id"]: r for r in ui.run_list(f"{EXPERIMENT}-jobs")}
    stages = sorted(values(r["data"]["tags"])["shrinkflow.stage"] for r in jobs.values())
    assert stages == sorted(["train"] + ["prune", "finetune"] * 2 + ["quantize"] * 2)
    by_name = {r["info"]["run_name"]: r for r in jobs.values()}
    quantize = by_name[
        "quantize torch/resnet20/seed0/quantized/fixed_w8/finetuned/l1_unstructured/0.8"
    ]
    chain = [quantize]
    while "shrinkflow.source_run_id" in (tags := values(chain[-1]["data"]["tags"])):
        assert "mlflow.parentRunId" not in tags
        chain.append(jobs[tags["shrinkflow.source_run_id"]])
    assert [values(r["data"]["tags"])["shrinkflow.stage"] for r in chain] == [
        "quantize", "finetune", "prune", "train",
    ]  # fmt: skip
    # A job keeps its full config as params; the artefact's row links to the job that wrote it.
    assert "evaluate.batch_sizes" in values(quantize["data"]["params"])
    (row,) = ui.run_list(EXPERIMENT, filter="params.quant_method = 'fixed_w8'")
    assert values(row["data"]["tags"])["shrinkflow.source_run_id"] == quantize["info"]["run_id"]
