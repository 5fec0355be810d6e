"""GPU slots (shrinkflow.gpu_slots): which GPU a training job is pinned to, with fake GPU lists.

The allocation is bookkeeping (flock'ed files, environment variables), so it is tested on CPU:
``CUDA_VISIBLE_DEVICES`` stands for the machine's GPUs and other jobs are small Python
processes that hold slots until they are killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shrinkflow import cluster, gpu_slots
from shrinkflow.config import load_params
from shrinkflow.errors import ShrinkflowError
from shrinkflow.gpu_slots import hold_gpu_slots

ROOT = Path(__file__).resolve().parents[1]
# Another job: holds GPU slots, prints the devices it was pinned to, lives until stdin closes.
HOLDER = (
    "import sys\n"
    "from shrinkflow.gpu_slots import hold_gpu_slots\n"
    "print(','.join(hold_gpu_slots(int(sys.argv[1]))), flush=True)\n"
    "sys.stdin.read()\n"
)
NVIDIA_SMI_L = """\
GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-aaaa-bbbb-cccc-000000000000)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-22222222-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  0: (UUID: MIG-33333333-aaaa-bbbb-cccc-000000000000)
  MIG 3g.20gb     Device  1: (UUID: MIG-44444444-aaaa-bbbb-cccc-000000000000)
"""


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list]:
    """Two fake GPUs, two jobs per GPU, a private slot folder and a clean slate in this process;
    yields the list that ``holder`` appends its processes to (all killed afterwards)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "2")
    monkeypatch.setenv(gpu_slots.DIR_ENV, str(tmp_path / "slots"))
    for name in (gpu_slots.SLOT_ENV, gpu_slots.TF_GROWTH_ENV, "SLURM_JOB_ID"):
        monkeypatch.setenv(name, "")  # recorded, so that what the tests set is removed after
        monkeypatch.delenv(name)
    monkeypatch.setattr(gpu_slots, "_held", [])
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait()
    for slot in gpu_slots._held:
        os.close(slot.fd)


def holder(processes: list, gpus: int = 1) -> tuple[subprocess.Popen, str]:
    """Start a job that holds ``gpus`` slots; it and the devices it got."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(gpus)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    processes.append(process)
    return process, process.stdout.readline().strip()


def test_nvidia_smi_listing_gives_uuids_and_mig_instances_instead_of_their_gpu() -> None:
    assert gpu_slots.parse_nvidia_smi(NVIDIA_SMI_L) == [
        "GPU-11111111-aaaa-bbbb-cccc-000000000000",
        "MIG-33333333-aaaa-bbbb-cccc-000000000000",
        "MIG-44444444-aaaa-bbbb-cccc-000000000000",
    ]
    assert gpu_slots.parse_nvidia_smi("No devices were found\n") == []


@pytest.mark.parametrize(
    ("listed", "devices"),
    [("0,1", ["0", "1"]), (" 2, 3 ", ["2", "3"]), ("1,-1,2", ["1"]), ("-1", []), ("", [])],
)
def test_visible_devices_follow_cuda_visible_devices_as_cuda_reads_it(
    monkeypatch: pytest.MonkeyPatch, listed: str, devices: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert gpu_slots.visible_devices() == devices


def test_jobs_go_to_the_least_loaded_gpu_and_at_most_n_per_gpu(machine: list) -> None:
    got = [holder(machine)[1] for _ in range(4)]
    assert got == ["0", "1", "0", "1"]  # ties go to the first listed GPU
    with pytest.raises(ShrinkflowError, match=r"all 4 GPU slots are taken .*JOBS_PER_GPU=2"):
        hold_gpu_slots(wait_s=0.2, poll_s=0.05)
    assert gpu_slots.SLOT_ENV not in os.environ


def test_a_killed_job_frees_its_slot_and_a_waiting_job_takes_it(machine: list) -> None:
    jobs = [holder(machine) for _ in range(4)]
    on_gpu_1 = next(process for process, device in jobs if device == "1")
    killer = threading.Timer(0.5, os.kill, (on_gpu_1.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    assert hold_gpu_slots(wait_s=10, poll_s=0.05) == ["1"]
    assert time.monotonic() - start >= 0.4  # it waited for the kill
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ[gpu_slots.SLOT_ENV].startswith("1.")
    assert os.environ[gpu_slots.TF_GROWTH_ENV] == "true"  # two jobs per GPU: TF must share
    killer.join()


def test_a_distributed_job_gets_distinct_gpus_and_its_workers_keep_them(
    machine: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    holder(machine)  # one job on GPU 0
    assert hold_gpu_slots(2) == ["1", "2"]
    # a worker it starts inherits the pinning and takes nothing more
    assert holder(machine, 1)[1] == ""
    assert hold_gpu_slots(2) == ["1", "2"]  # a second stage in this process: the same slots


@pytest.mark.parametrize(
    ("env", "gpus"),
    [
        ({}, 0),  # the job does not train on a GPU
        ({gpu_slots.JOBS_PER_GPU_ENV: "0"}, 1),  # slots turned off
        ({gpu_slots.SLOT_ENV: "0.0"}, 1),  # a parent shrinkflow process holds the slot
        ({"CUDA_VISIBLE_DEVICES": "-1"}, 1),  # no GPU visible
        ({"CUDA_VISIBLE_DEVICES": "0"}, 2),  # fewer GPUs than the job needs: the backend says so
    ],
)
def test_nothing_is_held_where_the_job_needs_no_pinning(
    machine: list, monkeypatch: pytest.MonkeyPatch, env: dict, gpus: int
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert hold_gpu_slots(gpus) == []
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before
    assert not gpu_slots._held


def test_without_a_gpu_or_nvidia_smi_nothing_is_held(
    machine: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    assert gpu_slots.visible_devices() == []
    assert hold_gpu_slots() == []
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_under_slurm_the_scheduler_chose_unless_jobs_per_gpu_is_set(
    machine: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv(gpu_slots.JOBS_PER_GPU_ENV)
    assert hold_gpu_slots() == []
    # the gpu profile run inside one Slurm allocation: the user asks for slots explicitly
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "2")
    assert hold_gpu_slots() == ["0"]


def test_jobs_per_gpu_must_be_a_whole_number(machine: list, monkeypatch) -> None:
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "two")
    with pytest.raises(ShrinkflowError, match=r"SHRINKFLOW_JOBS_PER_GPU: 'two' is not a whole"):
        hold_gpu_slots()


def test_gpu_profile_offers_gpus_times_jobs_per_gpu_slots(machine: list, monkeypatch) -> None:
    """The profile as Snakemake reads it (YTE-rendered), and rule names the workflow has."""
    from snakemake.profiles import ProfileConfigFileParser

    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "3")
    profile = ROOT / "workflow/profiles/gpu/config.yaml"
    with profile.open() as stream:
        parsed = ProfileConfigFileParser().parse(stream)
    assert parsed["resources"] == ["gpu_slots=6"]
    rules = {item.split(":")[0] for item in parsed["set-resources"]}
    assert rules == {"train", "prune", "finetune", "quantize"}
    smk = "".join(p.read_text() for p in (ROOT / "workflow/rules").glob("*.smk"))
    assert all(f"rule {rule}:" in smk for rule in rules)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ShrinkflowError, match="no GPU found"):
        gpu_slots.total_slots()


@pytest.mark.parametrize(
    ("stage", "pinned"),
    [("train", True), ("quantize qat_int8", True), ("quantize static_int8", False)],
)
def test_a_stage_holds_its_slot_before_it_imports_its_backend(
    machine: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage: str, pinned: bool
) -> None:
    from shrinkflow.stages import quantize, train

    seen: dict = {}

    class Imported(Exception):
        pass

    def backend_module(backend: str, job: str):
        seen["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise Imported

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(train, "backend_module", backend_module)
    monkeypatch.setattr(quantize, "backend_module", backend_module)
    holder(machine)  # GPU 0 is busier: the stage goes to GPU 1
    cfg = load_params([ROOT / "params.yaml"])
    with pytest.raises(Imported):
        if stage == "train":
            train.run(cfg, "torch", "resnet20", 0, tmp_path, tmp_path / "out")
        else:
            node = {"backend": "torch", "model": "resnet20", "stage": "baseline", "seed": 0}
            monkeypatch.setattr(quantize, "read_node", lambda folder: node)
            quantize.run(cfg, stage.split()[1], tmp_path, tmp_path, tmp_path / "out")
    assert seen["CUDA_VISIBLE_DEVICES"] == ("1" if pinned else "0,1")


# ---- Slurm: GPU shards and MPS pass the preflight where nodes offer them ---------------------

SHARING_NODES = cluster.parse_sinfo(
    "gpu01|gpu*|32|256000|gpu:a100:4(S:0-1),shard:a100:32(S:0-1)|2-00:00:00\n"
    "gpu02|mps|32|256000|gpu:4,mps:400|2-00:00:00\n"
    "cpu01|cpu|32|192000|(null)|infinite\n"
)


def test_sinfo_gres_lists_count_gpus_shards_and_mps() -> None:
    assert [(n.gpus, n.shares) for n in SHARING_NODES] == [
        (4, {"shard": 32, "mps": 0}),
        (4, {"shard": 0, "mps": 400}),
        (0, {"shard": 0, "mps": 0}),
    ]


@pytest.mark.parametrize(
    ("gres", "partition", "problem"),
    [
        ("shard:1", None, None),
        ("shard:a100:2", "gpu", None),
        ("mps:25", "mps", None),
        ("shard:1", "mps", "rule train asks for gres shard:1, but no node of partition mps offers"),
        ("mps:25", "gpu", "rule train asks for gres mps:25, but no node of partition gpu offers"),
        ("shard:64", "gpu", "rule train asks for gres shard:64, but no node of partition gpu"),
        ("gpu:a100:1", "gpu", None),
    ],
)
def test_preflight_passes_gpu_shares_nodes_offer_and_names_those_they_do_not(
    gres: str, partition: str | None, problem: str | None
) -> None:
    resources = {"gres": gres, "cpus_per_task": 2, "mem_mb": 8000, "runtime": 240}
    if partition:
        resources["slurm_partition"] = partition
    found = cluster.problem(cluster.request_of("train", resources, threads=2), SHARING_NODES)
    assert found == problem if problem is None else found.startswith(problem)
    if problem:
        assert "GresTypes=gpu," in found


# ---- the gpu profile under Snakemake: at most the slots at once, each job on its own GPU ------

JOB = """\
rule all:
    input: expand("out/{i}.txt", i=range(4))

rule train:
    output: "out/{i}.txt"
    shell: "python -c 'import sys; sys.argv = [0, \\"{output}\\"]; exec(open(\\"job.py\\").read())'"
"""
JOB_PY = """\
import os, sys, time
from shrinkflow.gpu_slots import hold_gpu_slots
start = time.time()  # before the slot: a job that had to wait for one overlaps the others
hold_gpu_slots()
time.sleep(0.25)
open(sys.argv[1], "w").write(f"{os.environ['CUDA_VISIBLE_DEVICES']} {start} {time.time()}")
"""


def test_the_gpu_profile_runs_no_more_jobs_than_slots_each_on_its_own_gpu(
    machine: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Four `train` jobs on two fake GPUs, one job per GPU: Snakemake starts two at a time
    (gpu_slots=2; without the profile's limit all four would start and two would wait for a
    slot), never two on one GPU."""
    monkeypatch.setenv(gpu_slots.JOBS_PER_GPU_ENV, "1")
    (tmp_path / "Snakefile").write_text(JOB)
    (tmp_path / "job.py").write_text(JOB_PY)
    snakemake = Path(sys.executable).parent / "snakemake"
    profile = ROOT / "workflow/profiles/gpu"
    result = subprocess.run(
        [str(snakemake), "--profile", str(profile), "--cores", "4", "-q"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    runs = []
    for out in sorted((tmp_path / "out").iterdir()):
        device, start, end = out.read_text().split()
        runs.append((device, float(start), float(end)))
    assert {device for device, _, _ in runs} == {"0", "1"}
    for device, start, end in runs:
        beside = [d for d, s, e in runs if s < end and e > start]  # itself included
        assert len(beside) <= 2
        assert beside.count(device) == 1
