"""A pruning sweep's wall time against --cores 1 and 2, and a projection to a cluster.

Run from the project root inside the virtualenv (or `make bench`):

    python benchmarks/scaleout.py [--nodes 1 4 16 64] [--node-images-per-second X]
    python benchmarks/scaleout.py --measure-throughput   # on a GPU node: its X for the above

Part 1, measured: one sweep (digits at CIFAR's 32x32, PyTorch ResNet-20, one-shot L1 and the
polynomial schedule at 50 % and 70 %, fine-tuned, int8-quantized and evaluated) runs with
`snakemake --cores 1` and then `--cores 2`, each in a fresh workspace, side by side in this one
run. It prints both wall times and their ratio.

Part 2, projected from what part 1 measured: the wall time of a 100-point CIFAR-10 sweep of
ResNet-20 (two methods x 50 sparsities, baseline trained `--train-epochs`, each point fine-tuned
`--finetune-epochs`, gradual points re-trained `--gradual-epochs`, every artefact int8-quantized
and evaluated) on N nodes that run one job at a time (one GPU each). Each job is split into
  - a fixed part that does not grow with the data: process start, framework and MLflow imports,
    model building, checkpointing, calibration, latency timing; measured as the job's wall time
    minus its compute, and
  - a compute part that grows with the images: the training epochs (MLflow's per-epoch
    `epoch_seconds`) and the evaluation's passes over the held-out images (images / measured
    throughput),
and the compute part is scaled from digits' image counts to CIFAR-10's 45,000 / 5,000 / 10,000
train / val / test images and to the projected epochs. A GPU node divides the compute part by
its training throughput over this machine's (`--node-images-per-second`, measured on that node
with `--measure-throughput`); the fixed part stays, which is why it is printed. Jobs are placed
on the nodes by a list scheduler (longest remaining path first), as an executor with N job slots
would. Not modelled: Slurm's queue wait and the executor's status polling (both per job, both the
cluster's), and the one-off CIFAR download.
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from figures import recorded
from workspace import BIN, ROOT, fresh_workspace, timed

SWEEP = {  # the measured sweep: every job kind of a pruning sweep, small enough for 2 cores
    "backends": ["torch"],
    "models": ["resnet20"],
    "train": {"epochs": 4},
    "prune": {
        "methods": ["l1_unstructured", "gradual_polynomial"],
        "sparsities": [0.5, 0.7],
        "gradual": {"epochs": 2},
    },
    "finetune": {"epochs": 1},
    "sensitivity": {"ratios": []},
    "quantize": {"methods": ["static_int8"]},
    "evaluate": {"warmup": 2, "repeats": 10},
}
CIFAR_IMAGES = {"train": 45_000, "val": 5_000, "test": 10_000}  # CIFAR-10, val_fraction 0.1
TRAINING_RULES = ("train", "prune_gradual", "finetune")  # rules whose compute is epochs


def write_sweep_params(workspace: Path) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    for section, values in SWEEP.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, dict):
                    params[section][key].update(value)
                else:
                    params[section][key] = value
        else:
            params[section] = values
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


WALL_FILE = "wall_seconds.txt"  # the sweep's measured wall time, kept for --reuse


def run_sweep(cores: int, reuse: bool) -> tuple[float, Path]:
    """Wall seconds of the sweep with ``--cores cores`` in a fresh workspace (or, with
    ``reuse``, what an earlier run of this benchmark measured there) and the workspace."""
    workspace = ROOT / f"benchmarks/out/scaleout-cores{cores}"
    if reuse:
        return float((workspace / WALL_FILE).read_text()), workspace
    fresh_workspace(workspace)
    write_sweep_params(workspace)
    snakemake = [str(BIN / "snakemake"), "--profile", "workflow/profiles/local"]
    wall = timed([*snakemake, "--cores", str(cores)], workspace)
    (workspace / WALL_FILE).write_text(f"{wall:.3f}\n")
    return wall, workspace


def busy_seconds(workspace: Path) -> float:
    """The sum of every job's wall time: over the sweep's wall time, how many ran at once."""
    return sum(s for jobs in benchmark_walls(workspace).values() for _, s in jobs)


@dataclass
class JobKind:
    """What part 1 measured of one kind of job (medians over the jobs of that kind)."""

    wall: float  # seconds, from Snakemake's benchmark: file
    compute: float  # seconds of it that grow with the data (see the module docstring)
    epochs: int = 0  # training epochs in that compute (0: evaluation passes)


def benchmark_walls(workspace: Path) -> dict[str, list[tuple[Path, float]]]:
    """Every job's wall seconds by rule, with its benchmark file's path below the rule."""
    walls: dict[str, list[tuple[Path, float]]] = {}
    root = workspace / "logs/benchmark"
    for tsv in sorted(root.rglob("*.tsv")):
        with tsv.open() as handle:
            seconds = float(next(csv.DictReader(handle, delimiter="\t"))["s"])
        rule, *rest = tsv.relative_to(root).parts
        walls.setdefault(rule.removesuffix(".tsv"), []).append((Path(*rest), seconds))
    return walls


def epoch_seconds(workspace: Path) -> dict[str, list[float]]:
    """Per stage tag, each run's summed `epoch_seconds` (the compute of a training job)."""
    query = """
        SELECT t.value, r.run_uuid, SUM(m.value) FROM metrics m
        JOIN runs r ON r.run_uuid = m.run_uuid
        JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'shrinkflow.stage'
        WHERE m.key = 'epoch_seconds' GROUP BY r.run_uuid"""
    with sqlite3.connect(workspace / "mlflow.db") as db:
        sums: dict[str, list[float]] = {}
        for stage, _, seconds in db.execute(query):
            sums.setdefault(stage, []).append(seconds)
    return sums


def measure_kinds(workspace: Path) -> tuple[dict[str, JobKind], dict[str, int]]:
    """Job kinds of the cores-1 run (no job competed for a core there) and digits' counts."""
    manifest = next((workspace / "data/prepared").glob("*/manifest.json"))
    counts = json.loads(manifest.read_text())["counts"]
    walls = benchmark_walls(workspace)
    compute = epoch_seconds(workspace)
    summary = list(csv.DictReader((workspace / "results/summary.csv").open()))
    held_out = counts["val"] + counts["test"]
    eval_compute = [held_out / float(row["throughput_ips"]) for row in summary]
    med = statistics.median
    prune = walls["prune"]
    gradual = [s for path, s in prune if "gradual" in str(path)]
    one_shot = [s for path, s in prune if "gradual" not in str(path)]
    kinds = {
        "prepare": JobKind(med(s for _, s in walls["prepare"]), 0.0),
        "train": JobKind(
            med(s for _, s in walls["train"]), med(compute["train"]), SWEEP["train"]["epochs"]
        ),
        "sensitivity": JobKind(med(s for _, s in walls["sensitivity"]), 0.0),  # ratios: []
        "prune_one_shot": JobKind(med(one_shot), 0.0),
        "prune_gradual": JobKind(
            med(gradual), med(compute["prune"]), SWEEP["prune"]["gradual"]["epochs"]
        ),
        "finetune": JobKind(
            med(s for _, s in walls["finetune"]),
            med(compute["finetune"]),
            SWEEP["finetune"]["epochs"],
        ),
        "quantize": JobKind(med(s for _, s in walls["quantize"]), 0.0),
        "evaluate": JobKind(med(s for _, s in walls["evaluate"]), med(eval_compute)),
        "summarize": JobKind(med(s for _, s in walls["summarize"]), 0.0),
        "report": JobKind(med(s for _, s in walls["report"]), 0.0),
    }
    return kinds, counts


@dataclass
class Projection:
    """The 100-point CIFAR-10 sweep's jobs, timed for one node speed."""

    kinds: dict[str, JobKind]
    counts: dict[str, int]
    speedup: float  # node compute speed over this machine's
    epochs: dict[str, int]  # projected epochs per training kind
    durations: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.durations = {name: self.seconds(name, kind) for name, kind in self.kinds.items()}

    def seconds(self, name: str, kind: JobKind) -> float:
        fixed = kind.wall - kind.compute
        if kind.epochs:  # per image-epoch cost of digits, times CIFAR's images and epochs
            per_image_epoch = kind.compute / (kind.epochs * self.counts["train"])
            compute = per_image_epoch * CIFAR_IMAGES["train"] * self.epochs[name]
        else:  # passes over held-out images
            digits = self.counts["val"] + self.counts["test"]
            compute = kind.compute * (CIFAR_IMAGES["val"] + CIFAR_IMAGES["test"]) / digits
        return fixed + compute / self.speedup

    def jobs(self, points: int) -> list[tuple[str, str, list[str]]]:
        """(name, job kind, dependencies) of every job, each after its dependencies: prepare ->
        train -> evaluate/quantize of the baseline and sensitivity; per point prune -> finetune
        -> evaluate, quantize -> evaluate; then summarize -> report."""
        jobs = [
            ("prepare", "prepare", []),
            ("train", "train", ["prepare"]),
            ("eval base", "evaluate", ["train"]),
            ("quant base", "quantize", ["train"]),
            ("eval quant base", "evaluate", ["quant base"]),
            ("sensitivity", "sensitivity", ["train"]),  # the report reads its (empty) table
        ]
        ends = ["eval base", "eval quant base", "sensitivity"]
        for i in range(points):
            prune = "prune_gradual" if i % 2 else "prune_one_shot"  # the two methods alternate
            jobs += [
                (f"prune {i}", prune, ["train"]),
                (f"finetune {i}", "finetune", [f"prune {i}"]),
                (f"eval {i}", "evaluate", [f"finetune {i}"]),
                (f"quant {i}", "quantize", [f"finetune {i}"]),
                (f"eval quant {i}", "evaluate", [f"quant {i}"]),
            ]
            ends += [f"eval {i}", f"eval quant {i}"]
        return [*jobs, ("summarize", "summarize", ends), ("report", "report", ["summarize"])]

    def makespan(self, jobs: list[tuple[str, str, list[str]]], nodes: int) -> float:
        """Wall seconds of ``jobs`` on ``nodes`` one-job slots, longest remaining path first."""
        seconds = {name: self.durations[kind] for name, kind, _ in jobs}
        children: dict[str, list[str]] = {name: [] for name in seconds}
        waiting = {name: len(deps) for name, _, deps in jobs}
        for name, _, deps in jobs:
            for dep in deps:
                children[dep].append(name)
        rank: dict[str, float] = {}
        for name, _, _ in reversed(jobs):
            rank[name] = seconds[name] + max((rank[c] for c in children[name]), default=0.0)
        ready = [(-rank[name], name) for name, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        running: list[tuple[float, str]] = []
        now = 0.0
        while ready or running:
            while ready and len(running) < nodes:
                _, name = heapq.heappop(ready)
                heapq.heappush(running, (now + seconds[name], name))
            now, done = heapq.heappop(running)
            for child in children[done]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    heapq.heappush(ready, (-rank[child], child))
        return now


def measure_throughput(seconds: float = 30.0) -> None:
    """Training images/s of ResNet-20 at 32x32, batch 128, on this node's best device."""
    import torch

    from shrinkflow.backends.torch.models import create_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model("resnet20", num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(128, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (128,), device=device)
    steps, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        if steps == 10:  # the first steps pay for allocation and kernel selection
            if device == "cuda":
                torch.cuda.synchronize()
            start, steps = time.perf_counter(), 0
    if device == "cuda":
        torch.cuda.synchronize()
    rate = steps * 128 / (time.perf_counter() - start)
    print(f"{device}: {rate:,.0f} training images/s (ResNet-20, 32x32, batch 128)")


def minutes(seconds: float) -> str:
    return f"{seconds / 3600:6.1f} h" if seconds >= 5400 else f"{seconds / 60:6.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--train-epochs", type=int, default=100)  # reference study 1's baseline
    parser.add_argument("--gradual-epochs", type=int, default=10)  # its re-training
    parser.add_argument("--finetune-epochs", type=int, default=5)  # its fine-tuning
    parser.add_argument(
        "--node-images-per-second",
        type=float,
        help="a GPU node's training throughput (from --measure-throughput on that node)",
    )
    parser.add_argument("--measure-throughput", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="re-print from the last run's workspaces, no sweep"
    )
    args = parser.parse_args()
    if args.measure_throughput:
        measure_throughput()  # one node's figure, printed for --node-images-per-second
        return
    with recorded("scaleout"):
        sweep_and_project(args)


def sweep_and_project(args: argparse.Namespace) -> None:
    """Part 1 measured, part 2 projected from it (the module's docstring)."""
    walls = {cores: run_sweep(cores, args.reuse) for cores in (1, 2)}
    (wall_1, workspace), (wall_2, _) = walls[1], walls[2]
    kinds, counts = measure_kinds(workspace)
    jobs = sum(len(v) for v in benchmark_walls(workspace).values())
    points = len(SWEEP["prune"]["methods"]) * len(SWEEP["prune"]["sparsities"])
    print(f"measured sweep: digits 32x32, ResNet-20, {points} points, {jobs} jobs")
    print(f"  --cores 1   {wall_1:7.1f} s")
    print(f"  --cores 2   {wall_2:7.1f} s   {wall_1 / wall_2:.2f}x faster than --cores 1")
    for cores, (wall, folder) in walls.items():
        print(
            f"  --cores {cores}: jobs busy {busy_seconds(folder):.1f} s in all, "
            f"{busy_seconds(folder) / wall:.2f} running at once on average"
        )
    print("per job kind (median, --cores 1): wall = fixed + compute")
    for name, kind in kinds.items():
        print(
            f"  {name:<15} {kind.wall:6.1f} s = {kind.wall - kind.compute:5.1f} s fixed"
            f" + {kind.compute:5.1f} s compute"
        )

    base_rate = counts["train"] * kinds["train"].epochs / kinds["train"].compute
    print(f"this machine trains {base_rate:,.0f} images/s (ResNet-20, 32x32, in the train job)")
    epochs = {
        "train": args.train_epochs,
        "prune_gradual": args.gradual_epochs,
        "finetune": args.finetune_epochs,
    }
    speeds = {f"nodes like this machine ({base_rate:,.0f} images/s)": 1.0}
    # What no GPU can beat: compute takes no time, each job still pays its fixed part.
    speeds["the floor: compute free, fixed costs only"] = float("inf")
    if args.node_images_per_second:
        speeds[f"nodes at {args.node_images_per_second:,.0f} images/s (GPU, measured there)"] = (
            args.node_images_per_second / base_rate
        )
    print(
        f"projection: {args.points}-point CIFAR-10 sweep, ResNet-20, train {args.train_epochs} "
        f"epochs, gradual {args.gradual_epochs}, fine-tune {args.finetune_epochs}, int8 + "
        f"evaluation of every artefact ({5 * args.points + 8} jobs)"
    )
    for label, speedup in speeds.items():
        projection = Projection(kinds, counts, speedup, epochs)
        plan = projection.jobs(args.points)
        total = sum(projection.durations[kind] for _, kind, _ in plan)
        fixed = sum(kinds[kind].wall - kinds[kind].compute for _, kind, _ in plan)
        print(
            f"  {label}: {total / 3600:.1f} node-hours, of which "
            f"{fixed / 3600:.1f} fixed; the baseline's training alone "
            f"{minutes(projection.durations['train']).strip()}"
        )
        for nodes in args.nodes:
            print(f"    {nodes:>4} nodes  {minutes(projection.makespan(plan, nodes))}")


if __name__ == "__main__":
    sys.exit(main())
