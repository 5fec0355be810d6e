"""A pipeline against a real `mlflow server`: every run, the lineage, one invocation id per
invocation, and the chosen model under the alias `champion`, all checked through the REST API."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow_server import Server, mlflow_server, tags
from test_pipeline_e2e import BIN, make_project

pytestmark = pytest.mark.slow
EXPERIMENT = "shrinkflow"
MODEL = "shrinkflow"
MODELS = Path("results/models/torch/resnet20")


def snakemake(project: Path, server: Server, *extra: str) -> None:
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": server.uri,
    }
    env.pop("SHRINKFLOW_INVOCATION_ID", None)
    result = subprocess.run(
        [str(BIN / "snakemake"), "--cores", "2", *extra],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Path, Server]:
    """The smallest full DAG (one sweep point, one quantization method), logged to a server."""
    project = make_project(tmp_path_factory.mktemp("served"), quantize_methods=["fixed_w4"])
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prune"]["methods"] = ["l1_unstructured"]
    params["sensitivity"]["ratios"] = [0.5]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        snakemake(project, server)
        yield project, server


def test_every_job_reached_the_server_as_one_invocation_with_lineage(served):
    project, server = served
    runs = server.runs(EXPERIMENT)
    stages = sorted(tags(r)["shrinkflow.stage"] for r in runs)
    assert stages == sorted(
        ["download", "prepare", "train", "sensitivity", "prune", "finetune", "summarize"]
        + ["quantize"] * 2  # the baseline and the fine-tuned point, fixed_w4
        + ["evaluate"] * 4  # the two float nodes and their two quantized ones
        + ["report"]
    )
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    invocations = {tags(r)["shrinkflow.invocation"] for r in runs}
    assert len(invocations) == 1, invocations
    by_id = {r["info"]["run_id"]: r for r in runs}
    evaluate = next(
        r
        for r in runs
        if tags(r)["shrinkflow.stage"] == "evaluate"
        and tags(r).get("shrinkflow.qmethod") == "fixed_w4"
        and tags(r).get("shrinkflow.method") == "l1_unstructured"
    )
    chain, run = [], evaluate
    while "mlflow.parentRunId" in tags(run):
        run = by_id[tags(run)["mlflow.parentRunId"]]
        chain.append(tags(run)["shrinkflow.stage"])
    assert chain == ["quantize", "finetune", "prune", "train", "prepare", "download"]
    with (project / "results/summary.csv").open() as handle:
        summary_ids = {row["run_id"] for row in csv.DictReader(handle)}
    assert summary_ids <= by_id.keys(), "the summary names runs the server does not have"


def test_the_champion_is_registered_from_the_run_that_wrote_it(served):
    project, server = served
    record = json.loads((project / "results/report/selection.json").read_text())
    champion = record["champion"]["label"]
    producer = json.loads((project / "results/models" / champion / "model/run.json").read_text())
    version = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert version["run_id"] == producer["run_id"]
    assert version["source"].endswith(f"{producer['run_id']}/artifacts/model")
    version_tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert version_tags["shrinkflow.label"] == champion
    assert version["description"] == record["champion"]["reason"]
    files = server.get("artifacts/list", run_id=producer["run_id"], path="model")["files"]
    assert any(f["path"].startswith("model/model.") for f in files), files
    fastest = server.get("registered-models/alias", name=MODEL, alias="fastest")["model_version"]
    assert version_tags["shrinkflow.top1"] == f"{record['champion']['top1']:.4f}"
    assert (
        fastest["run_id"]
        == json.loads(
            (project / "results/models" / record["fastest"]["label"] / "model/run.json").read_text()
        )["run_id"]
    )
    report = next(r for r in server.runs(EXPERIMENT) if tags(r)["shrinkflow.stage"] == "report")
    assert tags(report)["shrinkflow.champion"] == champion
    listed = server.get("artifacts/list", run_id=report["info"]["run_id"], path="report")
    assert "report/index.html" in {f["path"] for f in listed["files"]}


def test_a_second_invocation_gets_its_own_id_and_reuses_the_registered_version(served):
    project, server = served
    before = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    versions_before = server.get("model-versions/search", filter=f"name='{MODEL}'")
    snakemake(project, server, "--forcerun", "report")
    reports = [r for r in server.runs(EXPERIMENT) if tags(r)["shrinkflow.stage"] == "report"]
    assert len(reports) == 2
    assert len({tags(r)["shrinkflow.invocation"] for r in reports}) == 2
    after = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert after["version"] == before["version"]
    versions_after = server.get("model-versions/search", filter=f"name='{MODEL}'")
    assert len(versions_after["model_versions"]) == len(versions_before["model_versions"])
