"""What every stage that writes one model folder does around its backend call (train, prune,
finetune, quantize), written once.

- the resume folder beside the output (scratch: .dvcignore hides it, and neither Snakemake nor
  DVC declares it, so neither deletes it before a re-run);
- one MLflow run (in the jobs' experiment), tagged with the node, linked to the run that wrote
  the job's input, continued when the resume state names it, named `<stage> <node folder>`;
- a staging folder that replaces the output only when the job succeeds, holding the model, the
  job's facts (`<stage>.json`; a fine-tuning run's are `train.json`, as a baseline's) and the
  node's labels (node.json, run.json);
- the facts' numbers logged as metrics, and the folder as the run's artifact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrinkflow import tracking
from shrinkflow.backends.base import JobContext
from shrinkflow.dag import node_label, node_tags
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.stages import write_node
from shrinkflow.training import NO_VALIDATION_IMAGES

# What a training job (train, finetune) logs of its TrainResult, under which metric name.
TRAINING_METRICS = {"best_val_top1": "best_val_top1", "best_epoch": "best_epoch"}
TRAINING_METRICS["seconds"] = "train_seconds"


def resume_dir_for(out: Path) -> Path:
    """Where the job writing ``out`` keeps its per-epoch resume state."""
    return Path(out).parent / "resume"


@dataclass
class ModelJob:
    """The open job: its MLflow run, the folder to write the model into, the resume folder,
    and the facts the backend reported (set them before the block ends)."""

    run: tracking.JobRun
    staging: Path
    resume_dir: Path
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def context(self) -> JobContext:
        """What the backend job is handed: write into the staging folder, keep the resume
        state beside the output, log each epoch (or round) in this run."""
        return JobContext(self.staging, self.resume_dir, self.on_epoch, self.run.run_id)

    def on_epoch(self, step: int, metrics: dict[str, float]) -> None:
        """The backends' per-epoch (or per-round) callback: log ``metrics`` at ``step``."""
        self.run.log_metrics(metrics, step=step)


@contextmanager
def model_job(
    cfg: dict,
    stage: str,
    node: dict,
    out: Path,
    parent: Path,
    *,
    run_id: str | None = None,
    logged: Mapping[str, str] | None = None,
    run_name: str | None = None,
    facts_file: str | None = None,
) -> Iterator[ModelJob]:
    """Open the job of ``stage`` writing ``node`` to ``out`` from the folder ``parent``.

    ``run_id``: the run a matching resume state names (continued instead of a new one).
    ``logged``: which facts become metrics, under which name (default: every number).
    """
    resume_dir = resume_dir_for(out)
    resume_dir.mkdir(parents=True, exist_ok=True)
    with tracking.job_run(
        cfg,
        stage,
        out=out,
        tags=node_tags(node),
        source_run_id=tracking.read_run_ref(parent),
        run_id=run_id,
        run_name=run_name or f"{stage} {node_label(node)}",
    ) as run:
        with atomic_dir(out) as staging:
            job = ModelJob(run, staging, resume_dir)
            yield job
            facts = staging / (facts_file or f"{stage}.json")
            write_json(facts, job.facts, nan_means=NO_VALIDATION_IMAGES)
            write_node(staging, node, run.run_id, stage)
        numbers = {k: v for k, v in job.facts.items() if isinstance(v, int | float)}
        if logged is not None:
            numbers = {name: numbers[key] for key, name in logged.items()}
        run.log_metrics(numbers)
        run.log_artifact(out)  # a folder keeps its name: artifacts/model/...
