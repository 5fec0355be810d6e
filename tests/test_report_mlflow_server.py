"""One DAG against the shared services: the tracking server (`make mlflow-server`: MLflow on
PostgreSQL, artefacts served), restarted in the middle of training, and a DVC remote.

Every job's run arrives once and finished, with its metrics (the epochs logged while the server
was down too) and artefacts, the lineage, one invocation id per invocation, and the chosen model
under the alias `champion`, all checked through the REST API. With SHRINKFLOW_DVC_PUSH=1 the run
checks the DVC remote first and pushes every output at the end; a second clone pulls them and
re-runs nothing.

The server stores its runs in a throw-away PostgreSQL (MLFLOW_BACKEND_STORE_URI), or in SQLite
where PostgreSQL is not installed (`make services` installs it): what is checked here is the
server and its clients, the same with either store. tests/test_tracking_postgres.py checks the
PostgreSQL cluster the server keeps itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow_server import Server, TrackingServer, clean_env, tags, wait_for
from postgres_service import postgres_missing, postgres_service
from projects import BIN, EXPERIMENTS, job_counts, make_project, read_summary, run

pytestmark = pytest.mark.slow
MODEL = "shrinkflow-torch"  # report.registered_model, then the backend
OUTAGE_S = 5  # how long the server stays down, on top of its stop and start (~10 s together)
EPOCHS = 5  # the server stops after the first: the others (~1 s each) end while it is down
QMETHOD = "fixed_w4"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


@dataclass(frozen=True)
class Served:
    """The DAG's run: its project, the server (still serving), the server's folder, the DVC
    remote, Snakemake's output, the runs right after the DAG, and when the server went down and
    came back (ms)."""

    project: Path
    server: Server
    folder: Path
    dvc_remote: Path
    output: str
    runs: list[dict]
    down_ms: float
    up_ms: float


@contextmanager
def backend_store(folder: Path) -> Iterator[str]:
    """A fresh PostgreSQL database, or an SQLite file in ``folder`` without PostgreSQL."""
    if postgres_missing():
        yield f"sqlite:///{folder / 'mlflow.db'}"
        return
    with postgres_service() as uri:
        yield uri


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """The smallest DAG with the whole lineage (one sweep point, one quantization method, no
    sensitivity ratios: 14 jobs), two jobs at a time, logged to the tracking server, which
    stops as soon as the training job has logged its first epoch and comes back OUTAGE_S later
    on the same port. SHRINKFLOW_DVC_PUSH=1, with a folder as the project's DVC remote. The
    server keeps serving for the module's tests."""
    project = make_project(
        tmp_path_factory.mktemp("served") / "project",
        quantize_methods=[QMETHOD],
        prune={"methods": ["l1_unstructured"]},
        sensitivity={"ratios": []},
        train={"epochs": EPOCHS},
    )
    dvc_remote = project.parent / "dvc-remote"
    run([str(BIN / "dvc"), "remote", "add", "-d", "shared", str(dvc_remote)], project)
    folder = tmp_path_factory.mktemp("tracking") / "srv"
    with backend_store(folder.parent) as store:
        # MLflow's job runner (8 more processes importing MLflow at each start: ~8 s of the
        # server's start on two busy cores) serves MLflow's GenAI jobs, none of shrinkflow's.
        # tests/test_tracking_postgres.py starts the server as `make mlflow-server` does.
        env = clean_env(MLFLOW_BACKEND_STORE_URI=store, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        tracking = TrackingServer(folder, env)
        log, dag = project.parent / "snakemake.log", None
        try:
            tracking.start()
            with log.open("w") as out:
                dag = subprocess.Popen(
                    [str(BIN / "snakemake"), "--cores", "4"],
                    cwd=project,
                    env=clean_env(MLFLOW_TRACKING_URI=tracking.server.uri, SHRINKFLOW_DVC_PUSH="1"),
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip

            def training() -> bool:
                assert dag.poll() is None, log.read_text()[-3000:]
                return any(
                    tags(r)["shrinkflow.stage"] == "train"
                    and any(m["key"] == "val_top1" for m in r["data"].get("metrics", []))
                    for r in tracking.server.runs_so_far(*EXPERIMENTS)
                )

            wait_for(training, 300, "the first epoch's metrics")
            down_ms = time.time() * 1000
            assert tracking.stop() == 0
            time.sleep(OUTAGE_S)
            tracking.start()
            up_ms = time.time() * 1000
            assert dag.wait(timeout=600) == 0, log.read_text()[-5000:]
            yield Served(
                project=project,
                server=tracking.server,
                folder=folder,
                dvc_remote=dvc_remote,
                output=log.read_text(),
                runs=tracking.server.runs(*EXPERIMENTS),
                down_ms=down_ms,
                up_ms=up_ms,
            )
        finally:
            if dag is not None and dag.poll() is None:
                os.killpg(dag.pid, signal.SIGTERM)
                dag.wait()
            tracking.stop()


def same_files(local: Path, served: Path) -> bool:
    """Every file of the folder ``local`` is in ``served`` with the same bytes (but for the
    timestamp Snakemake adds to a directory output after its job ends)."""
    files = sorted(
        p.relative_to(local)
        for p in local.rglob("*")
        if p.is_file() and p.name != ".snakemake_timestamp"
    )
    return bool(files) and all(
        (served / f).is_file() and (served / f).read_bytes() == (local / f).read_bytes()
        for f in files
    )


def test_a_dag_rides_out_a_tracking_server_restart(served: Served):
    """Every job finished in one run, with its per-epoch metrics (those logged while the server
    was down included) and its artefacts, byte for byte."""
    runs, output = served.runs, served.output
    assert "Error in rule" not in output, output[-5000:]
    assert {r["info"]["status"] for r in runs} == {"FINISHED"}
    stages = Counter(tags(r)["shrinkflow.stage"] for r in runs)
    expected = Counter()
    for rule, n in job_counts(output).items():
        if rule != "all":  # a target without a command: Snakemake runs nothing for it
            expected[rule.removesuffix("_quantized")] += n  # evaluate_quantized runs `evaluate`
    assert stages == expected  # every job logged exactly one run
    named = [r["info"]["run_name"] for r in runs if tags(r)["shrinkflow.stage"] not in
             ("download", "prepare")]  # fmt: skip
    assert len(named) == len(set(named)), "a job logged two runs"

    by_id = {r["info"]["run_id"]: r for r in runs}
    rows = read_summary(served.project)
    assert {row["run_id"] for row in rows} <= by_id.keys()
    for row in rows:
        logged = {m["key"]: m["value"] for m in by_id[row["run_id"]]["data"]["metrics"]}
        assert logged["top1"] == pytest.approx(float(row["top1"]))

    train = next(r for r in runs if tags(r)["shrinkflow.stage"] == "train")
    history = served.server.get(
        "metrics/get-history", run_id=train["info"]["run_id"], metric_key="val_top1"
    )["metrics"]
    assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1))  # one per epoch
    assert any(served.down_ms < m["timestamp"] < served.up_ms for m in history), (
        "no epoch ended during the outage"
    )

    artifacts = served.folder / "artifacts"
    model_runs = Counter()
    for ref in (served.project / "results/models").rglob("model/run.json"):
        run = by_id[yaml.safe_load(ref.read_text())["run_id"]]
        stored = artifacts / run["info"]["experiment_id"] / run["info"]["run_id"] / "artifacts"
        assert same_files(ref.parent, stored / "model"), f"{ref.parent} did not arrive whole"
        model_runs[tags(run)["shrinkflow.stage"]] += 1
    assert model_runs == {"train": 1, "prune": 1, "finetune": 1, "quantize": 2}


def test_every_job_reached_the_server_as_one_invocation_with_lineage(served: Served):
    runs = served.runs
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
        and tags(r).get("shrinkflow.qmethod") == QMETHOD
        and tags(r).get("shrinkflow.method") == "l1_unstructured"
    )
    chain, run = [], evaluate
    while "shrinkflow.source_run_id" in tags(run):
        run = by_id[tags(run)["shrinkflow.source_run_id"]]
        chain.append(tags(run)["shrinkflow.stage"])
    assert chain == ["quantize", "finetune", "prune", "train", "prepare", "download"]
    summary_ids = {row["run_id"] for row in read_summary(served.project)}
    assert summary_ids <= by_id.keys(), "the summary names runs the server does not have"


def test_the_champion_is_registered_from_the_run_that_wrote_it(served: Served):
    project, server = served.project, served.server
    record = json.loads((project / "results/report/selection.json").read_text())
    champion = record["champion"]["shipped"]
    producer = json.loads((project / "results/models" / champion / "model/run.json").read_text())
    version = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert version["run_id"] == producer["run_id"]
    assert version["source"].startswith("models:/m-")  # a LoggedModel of the producing run
    version_tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    assert version_tags["shrinkflow.label"] == record["champion"]["label"]
    assert version_tags["shrinkflow.shipped"] == champion  # the seed best on validation
    assert version["description"] == record["champion"]["reason"]
    files = server.get("artifacts/list", run_id=producer["run_id"], path="model")["files"]
    assert any(f["path"].startswith("model/model.") for f in files), files
    fastest = server.get("registered-models/alias", name=MODEL, alias="fastest")["model_version"]
    assert version_tags["shrinkflow.top1"] == f"{record['champion']['top1']:.4f}"
    assert (
        fastest["run_id"]
        == json.loads(
            (
                project / "results/models" / record["fastest"]["shipped"] / "model/run.json"
            ).read_text()
        )["run_id"]
    )
    report = next(r for r in served.runs if tags(r)["shrinkflow.stage"] == "report")
    assert tags(report)["shrinkflow.champion"] == record["champion"]["label"]
    listed = server.get("artifacts/list", run_id=report["info"]["run_id"], path="report")
    assert "report/index.html" in {f["path"] for f in listed["files"]}


def md5s(root: Path) -> dict[str, str]:
    """md5 of every file DVC versions under results/ and data/ (the resume state is scratch)."""
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for top in ("results", "data")
        for path in sorted((root / top).rglob("*"))
        # (.snakemake_timestamp: Snakemake's empty marker in a folder output, which .dvcignore
        # keeps out of DVC)
        if path.is_file()
        and path.name not in (".gitignore", ".snakemake_timestamp")
        and "resume" not in path.parts
    }


def test_a_second_clone_pulls_the_checkpoints_and_reruns_nothing(served: Served, tmp_path: Path):
    """The run checked the remote before any job, and its onsuccess committed and pushed every
    output; a clone of the committed project pulls them all, byte for byte, and `dvc repro`
    runs no stage, so no new MLflow run appears. (Before the next test, which re-runs a job.)"""
    first, server, dvc = served.project, served.server, str(BIN / "dvc")
    assert f"dvc remote 'shared' ({served.dvc_remote}): writable" in served.output
    in_sync = run([dvc, "status", "--cloud"], first)
    assert in_sync.stdout.strip() == "Cache and remote 'shared' are in sync.", in_sync.stdout
    assert (first / "results/models/torch/resnet20/seed0/baseline/resume").is_dir()
    run([*GIT, "add", "-A"], first)
    run([*GIT, "commit", "-q", "-m", "smallest sweep"], first)
    runs_before = server.runs(*EXPERIMENTS)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(first), str(second)], tmp_path)
    assert not (second / "results").exists()
    run([dvc, "pull", "-q"], second)
    status = run([dvc, "status"], second)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    repro = run([dvc, "repro"], second, MLFLOW_TRACKING_URI=server.uri)  # where a job would log
    stages = run([dvc, "stage", "list", "--name-only"], second).stdout.split()
    jobs = sum(n for rule, n in job_counts(served.output).items() if rule != "all")
    assert "train@torch-resnet20-0" in stages and len(stages) == jobs  # a stage per job
    skipped = [line.split("'")[1] for line in repro.stdout.splitlines() if "skipping" in line]
    assert sorted(skipped) == sorted(stages) and "Running stage" not in repro.stdout
    runs_after = server.runs(*EXPERIMENTS)
    assert len(runs_after) == len(runs_before)  # no job ran: no new MLflow run
    assert [tags(r)["shrinkflow.stage"] for r in runs_after].count("train") == 1
    pulled, made = md5s(second), md5s(first)
    assert "results/models/torch/resnet20/seed0/baseline/model/model.pt" in pulled
    assert pulled == made  # every checkpoint, metric and report file, byte for byte


def test_a_second_invocation_gets_its_own_id_and_reuses_the_registered_version(served: Served):
    """(Last: it adds a report run.)"""
    project, server = served.project, served.server
    before = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    versions_before = server.get("model-versions/search", filter=f"name='{MODEL}'")
    run(
        [str(BIN / "snakemake"), "--cores", "2", "--forcerun", "report"],
        project,
        MLFLOW_TRACKING_URI=server.uri,
    )
    reports = [r for r in server.runs(*EXPERIMENTS) if tags(r)["shrinkflow.stage"] == "report"]
    assert len(reports) == 2
    assert len({tags(r)["shrinkflow.invocation"] for r in reports}) == 2
    after = server.get("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert after["version"] == before["version"]
    versions_after = server.get("model-versions/search", filter=f"name='{MODEL}'")
    assert len(versions_after["model_versions"]) == len(versions_before["model_versions"])
