"""The DAG through a real Slurm cluster, with workflow/profiles/slurm as users run it.

tests/slurm_cluster.py starts a one-node cluster with accounting (munged, MariaDB, slurmdbd,
slurmctld, slurmd) on this machine. The tiny DAG runs through `snakemake --profile
workflow/profiles/slurm`; the checks read Slurm's accounting (every job of the DAG is there,
COMPLETED, with the profile's resources) and the results. The profile asks for GPUs that the
test cluster does not have: as it is, it must stop before submitting anything (the preflight in
src/shrinkflow/cluster.py); with only its GPU requests set to 0 it must run everything.

The unit tests at the top check the preflight's parsing and comparisons without a cluster.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from projects import BIN, ROOT, job_counts, make_project, store_runs, tool_env
from slurm_cluster import PARTITION, SlurmCluster, slurm_cluster, unavailable

from shrinkflow import cluster
from shrinkflow.errors import ShrinkflowError

PROFILE = ROOT / "workflow/profiles/slurm"
UNAVAILABLE = unavailable()
needs_cluster = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
# The smallest DAG with every rule in it (14 Slurm jobs): TINY with one sweep point (gradual
# pruning, whose prune job the profile sends to a GPU) and one quantization method (TINY's full
# sweep has 31 jobs). Each job pays for two Snakemake start-ups (the job step and the job)
# besides its own CLI's. Ten of them follow one another (download, prepare, train, sensitivity,
# prune, finetune, quantize, evaluate_quantized, summarize, report); the others run beside them.
METHOD, SPARSITY, QMETHOD = "gradual_polynomial", 0.5, "fixed_w4"
# Snakemake as its console script runs it, except that the Slurm executor asks sacct for its
# jobs' states every STATUS_CHECK_S seconds. The plugin (2.8.0) waits 40 s before its first
# check and 10 s longer after each check that finds no job finished, up to 180 s: fine for
# hour-long jobs, but the tiny DAG's jobs end within seconds and each waited 12-33 s to be
# noticed, one after another along the DAG's ten-job critical path. Only when Snakemake notices
# that a job ended changes; what it submits, and what Slurm runs and records, do not.
STATUS_CHECK_S = 1
SNAKEMAKE = f"""
import sys
from snakemake.cli import main
from snakemake_executor_plugin_slurm import Executor

Executor.next_seconds_between_status_checks = property(
    lambda self: {STATUS_CHECK_S}, lambda self, seconds: None
)
sys.argv[0] = {str(BIN / "snakemake")!r}
sys.exit(main())
"""
# The most jobs the DAG has ready at once: after train, sensitivity and the baseline's quantize
# and evaluate. The test node has room for them all (the fixture `slurm`).
SIDE_BY_SIDE = 3


def test_sinfo_rows_become_nodes_of_partitions():
    text = (
        "gpu01|gpu|64|512000|gpu:a100:4(S:0-1)|2-00:00:00\n"
        "cpu01|cpu*|32|192000|(null)|infinite\n"
        "gpu02|gpu|64|256000|gpu:v100:2,gpu:t4:1|2-00:00:00\n"
    )
    nodes = cluster.parse_sinfo(text)
    assert [(n.name, n.partition, n.default, n.cpus, n.memory_mb, n.gpus) for n in nodes] == [
        ("gpu01", "gpu", False, 64, 512000, 4),
        ("cpu01", "cpu", True, 32, 192000, 0),
        ("gpu02", "gpu", False, 64, 256000, 3),
    ]
    assert nodes[0].max_minutes == 2 * 24 * 60
    assert nodes[1].max_minutes == float("inf")


@pytest.mark.parametrize(
    ("limit", "minutes"),
    [("30", 30), ("45:30", 45.5), ("4:00:00", 240), ("1-12:00:00", 2160), ("UNLIMITED", 1e999)],
)
def test_slurm_time_limits_are_read_in_minutes(limit, minutes):
    assert cluster.parse_minutes(limit) == minutes


NODES = cluster.parse_sinfo(
    "cpu01|cpu*|32|192000|(null)|1-00:00:00\ngpu01|gpu|16|64000|gpu:a100:2|2:00:00\n"
)


def ask(**resources) -> str | None:
    return cluster.problem(cluster.request_of("train", resources, threads=2), NODES)


def test_requests_that_fit_pass():
    assert ask(mem_mb=8000, runtime=600) is None  # the default partition: cpu
    assert ask(gpu=2, slurm_partition="gpu", cpus_per_task=16, runtime=120) is None
    assert ask(gres="gpu:a100:1", slurm_partition="gpu", mem_mb_per_cpu=4000) is None
    assert ask(gpu=1, slurm_partition="cpu,gpu") is None  # sbatch picks the one that fits


def test_each_unmet_request_is_named_with_what_the_partition_has():
    assert (
        ask(gpu=1) == "rule train asks for 1 GPU, but no node of partition cpu does (none has one)"
    )
    assert ask(gres="gpu:4", slurm_partition="gpu") == (
        "rule train asks for 4 GPUs, but no node of partition gpu does (gpu01 has 2)"
    )
    assert ask(cpus_per_task=64) == (
        "rule train asks for 64 CPUs, but the largest node of partition cpu has 32 (cpu01)"
    )
    assert ask(mem_mb_per_cpu=8000, cpus_per_task=16, slurm_partition="gpu") == (
        "rule train asks for mem_mb=128000, but the largest node of partition gpu has 64000 MB "
        "(gpu01)"
    )
    assert ask(runtime=180, slurm_partition="gpu") == (
        "rule train asks for runtime=180 min, but partition gpu allows at most 120 min"
    )
    assert ask(slurm_partition="a100") == (
        "rule train asks for partition a100, which this cluster does not have "
        "(partitions: cpu, gpu)"
    )


def test_the_error_is_one_line_naming_the_first_rule_and_the_others():
    requests = [
        cluster.request_of(rule, {"gpu": gpu, "mem_mb": 1000}, threads=1)
        for rule, gpu in [("download", 0), ("train", 1), ("prune", 1), ("finetune", 1)]
    ]
    with pytest.raises(ShrinkflowError) as error:
        cluster.check(requests, NODES)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("rule train asks for 1 GPU, but no node of partition cpu does")
    assert "; also rule prune, finetune (sinfo -N" in message


# ---- on the real cluster -------------------------------------------------------------------


def profile_without_gpus() -> list[str]:
    """The profile's set-resources, every GPU request set to 0, as `--set-resources` arguments.

    The test cluster has no GPU. A `--set-resources` on the command line replaces the profile's
    whole `set-resources` key (`snakemake --help`, under --profile), so the test repeats every
    entry of the profile file and changes only the GPU ones.
    """
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return [
        f"{rule}:{key}={0 if key in ('gpu', 'gpus') else value}"
        for rule, resources in profile["set-resources"].items()
        for key, value in resources.items()
    ]


def tiny_project(dest: Path) -> Path:
    return make_project(
        dest, quantize_methods=[QMETHOD], prune={"methods": [METHOD], "sparsities": [SPARSITY]}
    )


def snakemake(slurm: SlurmCluster, project: Path, *args: str, env: dict | None = None):
    path = f"{BIN}:{slurm.env['PATH']}"  # the venv's snakemake, then Slurm's clients
    environment = tool_env(SLURM_CONF=str(slurm.conf), PATH=path, **(env or {}))
    cmd = [str(BIN / "python"), "-c", SNAKEMAKE, "--profile", str(PROFILE), *args]
    return subprocess.run(cmd, cwd=project, env=environment, capture_output=True, text=True)


def submitted_jobs(output: str) -> Counter:
    """Jobs per rule in the DAG of a run (its "Job stats" table), less `all`: a target with no
    command, which Snakemake finishes itself without submitting it."""
    counts = Counter(job_counts(output))
    counts.pop("all")
    return counts


def rule_of(comment: str) -> str:
    """The rule in the comment the Slurm executor gives each job: rule_<name>[_wildcards_...]."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def profile_requests() -> list[dict]:
    """The resources the profile sets per rule."""
    return list(yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"].values())


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> SlurmCluster:
    """The test cluster, its node large enough for SIDE_BY_SIDE of the profile's largest
    requests at once, whatever this machine has: independent jobs then run side by side, as
    on a cluster, instead of one after another on a 2-CPU machine (each 2-CPU job mostly waits
    for imports on one core)."""
    requests = profile_requests()
    with slurm_cluster(
        tmp_path_factory.mktemp("slurm"),
        min_cpus=SIDE_BY_SIDE * max(r["cpus_per_task"] for r in requests),
        min_memory_mb=SIDE_BY_SIDE * max(r["mem_mb"] for r in requests),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """The tiny DAG through the profile; (project, its jobs per rule, snakemake's result,
    tracking store).

    MLFLOW_TRACKING_URI points outside the project: a job that did not get it would log to the
    project's mlflow.db instead.
    """
    project = tiny_project(tmp_path_factory.mktemp("project"))
    store = tmp_path_factory.mktemp("store") / "mlflow.db"
    result = snakemake(
        slurm,
        project,
        "--set-resources",
        *profile_without_gpus(),
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"},
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return project, submitted_jobs(result.stdout + result.stderr), result, store


def run_id(result: subprocess.CompletedProcess) -> str:
    line = next(x for x in result.stderr.splitlines() if x.startswith("SLURM run ID: "))
    return line.removeprefix("SLURM run ID: ")


@pytest.mark.slow
@needs_cluster
def test_every_job_of_the_dag_ran_as_a_completed_slurm_job(slurm, slurm_run):
    project, plan, result, _ = slurm_run
    jobs = [row for row in slurm.accounting() if row["JobName"] == run_id(result)]
    ran = Counter(rule_of(row["Comment"]) for row in jobs)
    assert ran == plan
    assert sum(ran.values()) == 14
    assert {row["State"] for row in jobs} == {"COMPLETED"}
    # the profile's requests reached sbatch: CPUs, memory and time limit per rule
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"]
    for row in jobs:
        wanted = profile[rule_of(row["Comment"])]
        tres = dict(item.split("=") for item in row["ReqTRES"].split(","))
        assert tres["cpu"] == str(wanted["cpus_per_task"]), row
        assert tres["mem"] == f"{wanted['mem_mb']}M", row
        assert "gres/gpu" not in tres
        assert cluster.parse_minutes(row["Timelimit"]) == wanted["runtime"], row


@pytest.mark.slow
@needs_cluster
def test_the_results_of_the_slurm_run_are_complete_and_tracked(slurm_run):
    project, plan, _, store = slurm_run
    with (project / "results/summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    point = (METHOD, str(SPARSITY))
    assert [
        (r["stage"], r["prune_method"], r["target_sparsity"], r["quant_method"]) for r in rows
    ] == [
        ("baseline", "", "", ""),
        ("finetuned", *point, ""),
        ("quantized", "", "", QMETHOD),
        ("quantized", *point, QMETHOD),
    ]
    assert float(rows[0]["top1"]) > 0.3  # two epochs on 8x8 digits; chance is 0.1
    assert 0.45 < float(rows[1]["measured_sparsity"]) <= 0.5
    for row in rows:
        metrics = project / Path(row["artifact"]).parent / "metrics.json"
        assert json.loads(metrics.read_text())["top1"] == pytest.approx(float(row["top1"]))
    assert (project / "results/report/index.html").stat().st_size > 10_000
    assert not (project / "mlflow.db").exists(), "a job ignored MLFLOW_TRACKING_URI"
    runs = store_runs(f"sqlite:///{store}")  # both experiments: the artefacts' and the jobs'
    stages = Counter(r.data.tags["shrinkflow.stage"] for r in runs)
    expected = Counter(plan)
    expected["evaluate"] += expected.pop("evaluate_quantized")
    assert stages == expected  # one run per Slurm job, every one of them in the shared store
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["shrinkflow.invocation"] for r in runs}) == 1


@pytest.mark.slow
@needs_cluster
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            None,
            "error: rule train asks for 1 GPU, but no node of partition {p} does (none has one)",
        ),
        ("train:mem_mb={mem}", "error: rule train asks for mem_mb={mem}, but the largest node"),
        ("train:cpus_per_task={cpus}", "error: rule train asks for {cpus} CPUs, but the largest"),
    ],
    ids=["gpu", "memory", "cpus"],
)
def test_a_request_the_cluster_cannot_meet_stops_the_run_before_any_submission(
    slurm, tmp_path, override, message
):
    project = tiny_project(tmp_path)
    values = {"p": PARTITION, "mem": slurm.memory_mb + 1, "cpus": slurm.cpus + 1}
    args = []
    if override:  # the profile without GPUs, and one request too large for the node
        args = ["--set-resources", *profile_without_gpus(), override.format(**values)]
    before = len(slurm.accounting())
    result = snakemake(slurm, project, *args)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message.format(**values)), result.stderr
    if override is None:
        assert "; also rule prune, finetune (sinfo" in errors[0]  # gradual pruning trains
    assert len(slurm.accounting()) == before, "a job was submitted"
    left = {p.name for p in project.iterdir()} - {p.name for p in ROOT.iterdir()}
    assert left <= {".snakemake", ".git", ".gitignore"}, left  # no results, logs or runs
    assert not list(project.glob(".snakemake/locks/*"))  # the next run is not blocked
