"""`shrinkflow finetune`: re-train a pruned model with its masks (or smaller shape) fixed,
distilled from its baseline (``--teacher``) when ``finetune.distill`` is set."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from shrinkflow.backends.base import backend_module, use_safe_training_kernels
from shrinkflow.dag import node_label
from shrinkflow.data.prepared import load_prepared
from shrinkflow.gpu_slots import hold_gpu_slots
from shrinkflow.outputs import read_json
from shrinkflow.progress import say
from shrinkflow.stages import job_config, read_node
from shrinkflow.stages.model_job import TRAINING_METRICS, model_job, resume_dir_for
from shrinkflow.training.distill import check_teacher, distill_plan


def run(cfg: dict, model_dir: Path, data_dir: Path, out: Path, teacher: Path | None = None) -> None:
    node = {**read_node(model_dir), "stage": "finetuned"}
    use_safe_training_kernels(node)
    hold_gpu_slots()
    if teacher is not None:
        check_teacher(teacher, node)
    # Only a distilled run reads the teacher (the DAG always names it).
    teacher_dir = teacher if distill_plan(cfg, teacher) else None
    # Top-1 right after pruning, before fine-tuning: evaluate copies node.json into metrics.json,
    # so it reaches the summary beside the fine-tuned figure.
    pruned = model_dir / "prune.json"
    node["pruned_val_top1"] = read_json(pruned).get("val_top1") if pruned.is_file() else None
    seeded = job_config(cfg, node["seed"])  # the pruned node's training seed
    finetune = backend_module(node["backend"], "finetune")
    data = load_prepared(data_dir)
    resume_dir = resume_dir_for(out)
    fingerprint = finetune.finetune_fingerprint(seeded, model_dir, data, teacher_dir)
    resume_state = backend_module(node["backend"], "resume_state")
    resumed = resume_state.resumable_run_id(resume_dir, fingerprint)
    with model_job(
        cfg,
        "finetune",
        node,
        out,
        model_dir,
        run_id=resumed,
        logged=TRAINING_METRICS,
        facts_file="train.json",
    ) as job:
        result = finetune.finetune_model(
            seeded,
            model_dir,
            data,
            job.context,
            teacher_dir,
        )
        job.facts = asdict(result)
    say(f"finetune {node_label(node)}: best val top-1 {result.best_val_top1:.4f}")
