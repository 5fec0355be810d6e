"""The whole DAG run for real: Snakemake, then DVC (commit, repro, push/pull), tracked in MLflow."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {  # the smallest DAG that still exercises every stage and every pruning family
    "data": {"image_size": 8},
    "train": {"epochs": 2, "batch_size": 128, "warmup_epochs": 0},
    "prune": {
        "methods": ["l1_unstructured", "gradual_polynomial", "structured_sensitivity"],
        "sparsities": [0.5],
    },
    "finetune": {"epochs": 1},
    "sensitivity": {"ratios": [0.25, 0.5], "max_drop": 1.0},  # every ratio passes: smoke only
    "evaluate": {"batch_sizes": [1, 32], "warmup": 1, "repeats": 3},
}
POINTS = [(m, 0.5) for m in TINY["prune"]["methods"]]

pytestmark = pytest.mark.slow


def make_project(dest: Path) -> Path:
    """A fresh checkout-like copy of the project with the tiny params written into params.yaml."""
    for name in ["Snakefile", "dvc.yaml", "workflow", ".dvc", "src", ".dvcignore"]:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(
                source,
                dest / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("tmp", "cache", "__pycache__", "*.egg-info"),
            )
        elif source.exists():
            shutil.copy(source, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["prune"]["gradual"]["epochs"] = 1
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def read_summary(project: Path) -> list[dict]:
    with (project / "results/summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def mlflow_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("shrinkflow")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def snakemake_project(tmp_path_factory) -> Path:
    project = make_project(tmp_path_factory.mktemp("smk"))
    run([str(BIN / "snakemake"), "--profile", "workflow/profiles/local", "--cores", "2"], project)
    return project


def test_snakemake_runs_the_dag_and_writes_the_summary(snakemake_project):
    rows = read_summary(snakemake_project)
    assert [(r["stage"], r["prune_method"], r["target_sparsity"]) for r in rows] == [
        ("baseline", "", ""),
        *[("finetuned", method, str(sparsity)) for method, sparsity in POINTS],
    ]
    baseline = rows[0]
    assert (baseline["backend"], baseline["model"]) == ("torch", "resnet20")
    assert float(baseline["top1"]) > 0.3  # two epochs on 8x8 digits; chance is 0.1
    assert int(baseline["params"]) == int(baseline["nonzero_params"]) > 0
    model_file = snakemake_project / baseline["artifact"] / "model.pt"
    assert int(baseline["size_bytes"]) == model_file.stat().st_size
    assert 0 < int(baseline["gzip_bytes"]) < int(baseline["size_bytes"])
    assert float(baseline["latency_ms_b1"]) > 0 and float(baseline["throughput_ips"]) > 0
    by_method = {r["prune_method"]: r for r in rows[1:]}
    for method in ("l1_unstructured", "gradual_polynomial"):
        # measured from the saved weights: the output layer is excluded, so a little under 0.5
        assert 0.45 < float(by_method[method]["measured_sparsity"]) <= 0.5
        assert int(by_method[method]["params"]) == int(baseline["params"])
    structured = by_method["structured_sensitivity"]
    assert int(structured["params"]) < int(baseline["params"])  # physically smaller
    assert int(structured["macs"]) < int(baseline["macs"])
    assert float(structured["measured_sparsity"]) > 0.3  # removed weights count as gone
    assert not list(snakemake_project.rglob(".tmp-*")), "a temporary output was left behind"
    assert (snakemake_project / "results/models/torch/resnet20/sensitivity/ratios.json").is_file()


def test_every_job_is_an_mlflow_run_with_lineage(snakemake_project):
    runs = mlflow_runs(snakemake_project)
    stages = sorted(r.data.tags["shrinkflow.stage"] for r in runs)
    assert stages == sorted(
        ["download", "prepare", "train", "sensitivity", "summarize"]
        + ["prune", "finetune"] * len(POINTS)
        + ["evaluate"] * (1 + len(POINTS))
    )
    by_stage = {
        r.data.tags["shrinkflow.stage"]: r for r in runs if "shrinkflow.method" not in r.data.tags
    }
    assert all(r.info.status == "FINISHED" for r in runs)
    parent = {stage: r.data.tags.get("mlflow.parentRunId") for stage, r in by_stage.items()}
    assert parent["prepare"] == by_stage["download"].info.run_id
    assert parent["train"] == by_stage["prepare"].info.run_id
    assert parent["evaluate"] == by_stage["train"].info.run_id
    train = by_stage["train"]
    assert train.data.params["train.epochs"] == "2"
    assert train.data.tags["shrinkflow.model"] == "resnet20"
    assert train.data.tags["shrinkflow.node"] == "baseline"
    assert by_stage["evaluate"].data.tags["shrinkflow.backend"] == "torch"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{snakemake_project / 'mlflow.db'}")
    history = client.get_metric_history(train.info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id, "model")}
    assert "model/model.pt" in artifacts
    row = read_summary(snakemake_project)[0]
    assert row["run_id"] == by_stage["evaluate"].info.run_id
    by_id = {r.info.run_id: r for r in runs}
    for method, sparsity in POINTS:  # baseline -> pruned -> fine-tuned -> evaluated, as a tree
        evaluated = next(
            r
            for r in runs
            if r.data.tags["shrinkflow.stage"] == "evaluate"
            and r.data.tags.get("shrinkflow.method") == method
        )
        finetune = by_id[evaluated.data.tags["mlflow.parentRunId"]]
        prune = by_id[finetune.data.tags["mlflow.parentRunId"]]
        assert finetune.data.tags["shrinkflow.stage"] == "finetune"
        assert prune.data.tags["shrinkflow.stage"] == "prune"
        assert prune.data.tags["shrinkflow.sparsity"] == str(sparsity)
        assert prune.data.tags["mlflow.parentRunId"] == train.info.run_id


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {
        words[0]: int(words[1])
        for words in (line.split() for line in table.splitlines())
        if len(words) == 2 and words[1].isdigit()
    }


def test_rerun_is_a_no_op_and_a_param_change_reruns_only_its_branch(snakemake_project, tmp_path):
    snakemake = str(BIN / "snakemake")
    dry = run([snakemake, "-n", "--cores", "2"], snakemake_project)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    preset = tmp_path / "more-repeats.yaml"
    preset.write_text("evaluate: {repeats: 4}\n")
    changed = run([snakemake, "-n", "--cores", "2", "--configfile", str(preset)], snakemake_project)
    assert job_counts(changed.stdout) == {"evaluate": 1 + len(POINTS), "summarize": 1, "all": 1}
    # one more sparsity: only the new branch of each method (and the summary) runs
    more = tmp_path / "more-sparsities.yaml"
    more.write_text("prune: {sparsities: [0.5, 0.8]}\n")
    grown = run([snakemake, "-n", "--cores", "2", "--configfile", str(more)], snakemake_project)
    n = len(POINTS)
    assert job_counts(grown.stdout) == {
        "prune": n,
        "finetune": n,
        "evaluate": n,
        "summarize": 1,
        "all": 1,
    }
    assert "pruned/l1_unstructured/0.8/model" in grown.stdout
    # a change to one method family's section re-runs only that family
    gradual = tmp_path / "gradual.yaml"
    gradual.write_text("prune: {gradual: {frequency: 5}}\n")
    regrown = run(
        [snakemake, "-n", "--cores", "2", "--configfile", str(gradual)], snakemake_project
    )
    assert job_counts(regrown.stdout) == {
        "prune": 1,
        "finetune": 1,
        "evaluate": 1,
        "summarize": 1,
        "all": 1,
    }


def test_dvc_commit_records_snakemake_outputs_without_rerunning(snakemake_project):
    dvc = str(BIN / "dvc")
    run([dvc, "commit", "-f", "-q"], snakemake_project)
    status = run([dvc, "status"], snakemake_project)
    assert "up to date" in status.stdout.lower(), status.stdout
    repro = run([dvc, "repro"], snakemake_project)
    assert "Running stage" not in repro.stdout


def test_dvc_push_and_pull_round_trip_the_checkpoint(snakemake_project):
    dvc = str(BIN / "dvc")
    model = snakemake_project / "results/models/torch/resnet20/baseline/model/model.pt"
    before = md5(model)
    run([dvc, "commit", "-f", "-q"], snakemake_project)
    run([dvc, "push", "-q"], snakemake_project)
    assert any((snakemake_project / "dvc-storage").rglob("*")), "nothing reached the remote"
    shutil.rmtree(snakemake_project / ".dvc/cache")
    shutil.rmtree(model.parent)
    run([dvc, "pull", "-q"], snakemake_project)
    assert md5(model) == before


def test_dvc_repro_runs_the_same_dag_from_scratch(tmp_path):
    project = make_project(tmp_path)
    result = run([str(BIN / "dvc"), "repro"], project)
    for stage in ["download", "prepare", "train", "sensitivity", "evaluate", "summarize"]:
        assert f"Running stage '{stage}" in result.stdout
    assert result.stdout.count("Running stage 'prune@") == len(POINTS)
    assert result.stdout.count("Running stage 'finetune@") == len(POINTS)
    assert len(read_summary(project)) == 1 + len(POINTS)
    assert (project / "dvc.lock").is_file()
    assert len(mlflow_runs(project)) == 6 + 3 * len(POINTS)
    again = run([str(BIN / "dvc"), "repro"], project)
    assert "Running stage" not in again.stdout


def test_a_killed_train_job_resumes_in_the_same_mlflow_run(tmp_path):
    """SIGKILL `shrinkflow train` mid-run; the re-run resumes and continues the same MLflow run."""
    import signal
    import time

    import torch

    project = make_project(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    shrinkflow = str(BIN / "shrinkflow")
    epochs = 12
    common = ["--set", f"train.epochs={epochs}", "--set", "train.batch_size=32"]
    run([shrinkflow, "download", "--out", "data/raw/digits"], project)
    run(
        [shrinkflow, "prepare", "--in", "data/raw/digits", "--out", "data/prepared/digits"], project
    )
    out = project / "results/models/torch/resnet20/baseline/model"
    train = [shrinkflow, "train", *common, "--backend", "torch", "--model", "resnet20",
             "--in", "data/prepared/digits", "--out", str(out)]  # fmt: skip
    state = out.parent / "resume/state.pt"
    job = subprocess.Popen(train, cwd=project, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "training ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= done < epochs and not out.exists()

    resumed = run(train, project)
    assert f"resuming from epoch {done + 1}/{epochs}" in resumed.stderr
    runs = [r for r in mlflow_runs(project) if r.data.tags["shrinkflow.stage"] == "train"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_top1")]
    assert sorted(steps) == list(range(1, epochs + 1))
    assert json.loads((out / "run.json").read_text())["run_id"] == runs[0].info.run_id
