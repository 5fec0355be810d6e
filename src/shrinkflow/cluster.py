"""Preflight for a Slurm run: does every job's request fit some node of its partition?

A request no node can satisfy (a GPU on a cluster without one, more memory than any node has,
a runtime above the partition's MaxTime, a GPU shard or MPS share where no node offers them)
would otherwise be found only when Slurm rejects or parks the job, possibly hours into a sweep.
The workflow's ``onstart`` (common.smk) calls ``preflight`` once, on the submitting host, before
the first job is submitted; it asks ``sinfo`` once for every node of every partition and
compares each job's resources the way snakemake-executor-plugin-slurm 2.8.0 turns them into
``sbatch`` options.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from shrinkflow.errors import ShrinkflowError

# One row per node and partition: name, partition ('*' marks the default), CPUs, memory (MB),
# generic resources (e.g. gpu:a100:4(S:0-1),shard:a100:16) and the partition's time limit.
SINFO = ["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%m|%G|%l"]
SINFO_TIMEOUT_S = 60  # sinfo answers in milliseconds; a minute means slurmctld is unreachable
_ENTRIES = re.compile(r",(?![^()]*\))")  # the commas between Gres entries, not inside (S:0,1)
# GPU shares a site may configure (docs/scaling-out.md): shards (jobs time-slice a GPU, Slurm
# only counts them) and CUDA MPS (its daemon runs the jobs' kernels side by side).
SHARES = ("shard", "mps")


@dataclass(frozen=True)
class Node:
    name: str
    partition: str
    default: bool  # the partition jobs go to when they name none
    cpus: int
    memory_mb: int
    gpus: int
    max_minutes: float  # the partition's MaxTime; inf when unlimited
    shares: dict[str, int] = field(default_factory=dict)  # SHARES the node offers, by name


@dataclass(frozen=True)
class Request:
    """What one job asks Slurm for (``partition`` None: the cluster's default partition)."""

    rule: str
    partition: str | None
    gpus: int
    cpus: int
    memory_mb: int | None
    minutes: int | None
    shares: dict[str, int] = field(default_factory=dict)  # SHARES asked for (gres shard:1)


def parse_minutes(limit: str) -> float:
    """Slurm's time format (``infinite``, ``[days-]hours:minutes:seconds``, ``minutes:seconds``,
    ``minutes``) in minutes."""
    if limit.strip().lower() in ("infinite", "unlimited", "n/a", "none"):
        return float("inf")
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, (minutes, seconds) = 0, parts
    else:
        hours, minutes, seconds = 0, parts[0], 0
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def gres_count(gres: str, name: str) -> int:
    """How many ``name`` a Gres string holds: ``gpu:a100:2(S:0-1),gpu:v100:1`` has 3 gpu,
    ``gpu:4,shard:32`` 32 shard, a bare ``gpu`` 1, ``(null)`` none."""
    total = 0
    for entry in _ENTRIES.split(gres.strip()):
        fields = re.sub(r"\(.*\)$", "", entry.strip()).split(":")
        if fields[0] == name:
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def gpu_count(gres: str) -> int:
    """GPUs in a Gres string (``gres_count``)."""
    return gres_count(gres, "gpu")


def parse_sinfo(text: str) -> list[Node]:
    """The rows of ``SINFO``'s output."""
    nodes = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, partition, cpus, memory, gres, limit = line.split("|")
        nodes.append(
            Node(
                name=name,
                partition=partition.rstrip("*"),
                default=partition.endswith("*"),
                cpus=int(cpus.rstrip("+")),
                memory_mb=int(memory.rstrip("+")),
                gpus=gpu_count(gres),
                max_minutes=parse_minutes(limit),
                shares={share: gres_count(gres, share) for share in SHARES},
            )
        )
    return nodes


def read_nodes() -> list[Node]:
    """Every node of every partition, from one ``sinfo`` call."""
    try:
        result = subprocess.run(
            SINFO, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ShrinkflowError(f"cannot ask Slurm for its nodes ({' '.join(SINFO)}): {exc}") from exc
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["no message"]
        raise ShrinkflowError(f"{' '.join(SINFO)} failed: {message[0]}")
    return parse_sinfo(result.stdout)


def _int(value: object) -> int | None:
    """A resource value as an int; None where Snakemake has not decided it yet (<TBD>)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def request_of(rule: str, resources, threads: int) -> Request:
    """What the Slurm executor (2.8.0) asks ``sbatch`` for, given a job's resources."""
    gpus = _int(resources.get("gpu")) or 0
    gres = resources.get("gres")
    gres = gres if isinstance(gres, str) else ""
    gpus = max(gpus, gpu_count(gres))
    tasks = _int(resources.get("tasks")) or 1
    cpus = _int(resources.get("cpus_per_task"))
    per_gpu = _int(resources.get("cpus_per_gpu"))
    if cpus is None or cpus < 0:
        cpus = per_gpu * gpus if gpus and per_gpu else threads
    cpus = max(cpus, 1) * tasks
    memory = _int(resources.get("mem_mb"))
    per_cpu = _int(resources.get("mem_mb_per_cpu"))
    if per_cpu:
        memory = per_cpu * cpus
    partition = resources.get("slurm_partition")
    return Request(
        rule=rule,
        partition=str(partition) if partition else None,
        gpus=gpus,
        cpus=cpus,
        memory_mb=memory,
        minutes=_int(resources.get("runtime")),
        shares={share: n for share in SHARES if (n := gres_count(gres, share))},
    )


def problem(request: Request, nodes: list[Node]) -> str | None:
    """Why no node can run ``request``, or None if one can."""
    if request.partition is None:
        defaults = [n for n in nodes if n.default]
        candidates = defaults or nodes
        where = f"partition {defaults[0].partition}" if defaults else "the cluster"
    else:  # sbatch takes a comma-separated list and uses whichever fits first
        wanted = request.partition.split(",")
        known = {n.partition for n in nodes}
        if unknown := [p for p in wanted if p not in known]:
            return (
                f"rule {request.rule} asks for partition {', '.join(unknown)}, which this "
                f"cluster does not have (partitions: {', '.join(sorted(known)) or 'none'})"
            )
        candidates = [n for n in nodes if n.partition in wanted]
        where = f"partition {request.partition}"
    if not candidates:
        return None  # sinfo listed nothing: nothing to compare with, sbatch will say
    ask = f"rule {request.rule} asks for"
    if request.gpus and max(n.gpus for n in candidates) < request.gpus:
        most = max(candidates, key=lambda n: n.gpus)
        have = f"{most.name} has {most.gpus}" if most.gpus else "none has one"
        return f"{ask} {_plural(request.gpus, 'GPU')}, but no node of {where} does ({have})"
    for share, wanted in request.shares.items():
        if max(n.shares.get(share, 0) for n in candidates) < wanted:
            return (
                f"{ask} gres {share}:{wanted}, but no node of {where} offers that many GPU "
                f"{share}s (the site's slurm.conf needs GresTypes=gpu,{share} and a node "
                f"Gres=...,{share}:N; docs/scaling-out.md)"
            )
    if max(n.cpus for n in candidates) < request.cpus:
        most = max(candidates, key=lambda n: n.cpus)
        return (
            f"{ask} {_plural(request.cpus, 'CPU')}, but the largest node of {where} has "
            f"{most.cpus} ({most.name})"
        )
    if request.memory_mb and max(n.memory_mb for n in candidates) < request.memory_mb:
        most = max(candidates, key=lambda n: n.memory_mb)
        return (
            f"{ask} mem_mb={request.memory_mb}, but the largest node of {where} has "
            f"{most.memory_mb} MB ({most.name})"
        )
    limit = max(n.max_minutes for n in candidates)
    if request.minutes and request.minutes > limit:
        return f"{ask} runtime={request.minutes} min, but {where} allows at most {limit:g} min"
    if not any(
        n.gpus >= request.gpus
        and all(n.shares.get(share, 0) >= k for share, k in request.shares.items())
        and n.cpus >= request.cpus
        and n.memory_mb >= (request.memory_mb or 0)
        for n in candidates
    ):
        return (
            f"{ask} {_plural(request.gpus, 'GPU')}, {_plural(request.cpus, 'CPU')} and "
            f"mem_mb={request.memory_mb} on one node, but no node of {where} has all three"
        )
    return None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def check(requests: Iterable[Request], nodes: list[Node]) -> None:
    """Raise one ShrinkflowError naming the first rule no node can run (and how many more)."""
    failing: dict[str, str] = {}
    for request in requests:
        if request.rule not in failing and (reason := problem(request, nodes)):
            failing[request.rule] = reason
    if failing:
        first, *others = failing.values()
        more = f"; also rule {', '.join(list(failing)[1:])}" if others else ""
        raise ShrinkflowError(
            f"{first}{more} (sinfo -N -o '%N %P %c %m %G %l'; change the requests in the "
            "profile's set-resources)"
        )


def preflight(jobs: Iterable, rule_order: list[str]) -> None:
    """Check the Snakemake jobs about to be submitted against the cluster; raise a one-line
    ShrinkflowError if any asks for what no node of its partition has, naming rules in
    ``rule_order`` (the DAG's jobs come as a set). Local and no-run jobs (``rule all``) never
    reach Slurm and are skipped."""
    requests = sorted(
        (
            request_of(job.rule.name, job.resources, job.threads)
            for job in jobs
            if not job.is_local and not job.is_norun
        ),
        key=lambda request: rule_order.index(request.rule),
    )
    if requests:
        check(requests, read_nodes())
