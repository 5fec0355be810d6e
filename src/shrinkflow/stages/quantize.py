"""`shrinkflow quantize`: one float model (baseline or fine-tuned point) -> one quantized one."""

from __future__ import annotations

from pathlib import Path

from shrinkflow.backends.base import (
    backend_module,
    check_quant_method,
    use_safe_training_kernels,
)
from shrinkflow.dag import QUANTIZABLE_STAGES, node_label
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.gpu_slots import hold_gpu_slots
from shrinkflow.progress import say
from shrinkflow.quantization import parse_quant_method
from shrinkflow.stages import job_config, read_node
from shrinkflow.stages.model_job import model_job, resume_dir_for
from shrinkflow.training.distill import check_teacher, distill_plan


def run(
    cfg: dict,
    method: str,
    model_dir: Path,
    data_dir: Path,
    out: Path,
    teacher: Path | None = None,
) -> None:
    """Quantize ``model_dir`` with ``method`` into ``out``. QAT distils from ``teacher`` (the
    baseline of the source's backend, model and seed) when ``finetune.distill`` is set; for the
    baseline's own QAT that is the source itself: its float self teaches its fake-quantized
    copy. The other methods do not train and do not read the teacher."""
    family = parse_quant_method(method).family
    source = read_node(model_dir)
    use_safe_training_kernels(source)  # qat_int8 trains it
    hold_gpu_slots(int(family == "qat"))
    if source["stage"] not in QUANTIZABLE_STAGES:
        raise ShrinkflowError(
            f"--in {model_dir}: a {source['stage']} model; quantize a baseline or a "
            "fine-tuned sweep point (the float models the DAG evaluates)"
        )
    check_quant_method(source["backend"], method, "--method")
    if teacher is not None:
        check_teacher(teacher, source)
    # Only a distilled QAT run reads the teacher.
    distilled = family == "qat" and distill_plan(cfg, teacher) is not None
    teacher_dir = teacher if distilled else None
    quantize = backend_module(source["backend"], "quantize")
    data = load_prepared(data_dir)
    node = {**source, "stage": "quantized", "quant_method": method}
    seeded = job_config(cfg, source["seed"])  # the source's training seed
    resume_dir = resume_dir_for(out)
    resumed = quantize.resumable_quantize_run_id(
        seeded, method, model_dir, data, resume_dir, teacher_dir
    )
    with model_job(cfg, "quantize", node, out, model_dir, run_id=resumed) as job:
        job.facts = quantize.quantize_model(
            seeded,
            method,
            model_dir,
            data,
            job.context,
            teacher_dir,
        )
    say(
        f"quantize {node_label(node)}: {job.facts['quantized_layers']} layer(s), val top-1 "
        f"{job.facts['val_top1']:.4f}"
    )
