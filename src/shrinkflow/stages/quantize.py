"""`shrinkflow quantize`: one float model (baseline or fine-tuned point) -> one quantized one."""

from __future__ import annotations

from pathlib import Path

from shrinkflow import tracking
from shrinkflow.backends.base import check_quant_method, get_backend
from shrinkflow.dag import QUANTIZABLE_STAGES, node_label, node_tags
from shrinkflow.data.prepared import load_prepared
from shrinkflow.errors import ShrinkflowError
from shrinkflow.outputs import atomic_dir, write_json
from shrinkflow.progress import say
from shrinkflow.quantization import parse_quant_method
from shrinkflow.stages import read_node, write_node
from shrinkflow.training import NO_VALIDATION_IMAGES


def run(cfg: dict, method: str, model_dir: Path, data_dir: Path, out: Path) -> None:
    parse_quant_method(method)
    source = read_node(model_dir)
    if source["stage"] not in QUANTIZABLE_STAGES:
        raise ShrinkflowError(
            f"--in {model_dir}: a {source['stage']} model; quantize a baseline or a "
            "fine-tuned sweep point (the float models the DAG evaluates)"
        )
    check_quant_method(source["backend"], method, "--method")
    backend = get_backend(source["backend"])
    data = load_prepared(data_dir)
    node = {**source, "stage": "quantized", "quant_method": method}
    label = node_label(node)
    resume_dir = out.parent / "resume"
    resume_dir.mkdir(parents=True, exist_ok=True)  # scratch beside the model; .dvcignore hides it
    with tracking.job_run(
        cfg,
        "quantize",
        out=out,
        tags=node_tags(node),
        parent_run_id=tracking.read_run_ref(model_dir),
        run_id=backend.resumable_quantize_run_id(cfg, method, model_dir, data, resume_dir),
        run_name=f"quantize {label}",
    ) as job:
        with atomic_dir(out) as staging:
            facts = backend.quantize_model(
                cfg,
                method,
                model_dir,
                data,
                staging,
                resume_dir,
                on_epoch=lambda epoch, metrics: job.log_metrics(metrics, step=epoch),
                run_id=job.run_id,
            )
            write_json(staging / "quantize.json", facts, nan_means=NO_VALIDATION_IMAGES)
            write_node(staging, node, job.run_id, "quantize")
        job.log_metrics({k: v for k, v in facts.items() if isinstance(v, int | float)})
        job.log_artifact(out)  # a folder keeps its name: artifacts/model/model.pt2
        say(
            f"quantize {label}: {facts['quantized_layers']} layer(s), val top-1 "
            f"{facts['val_top1']:.4f}"
        )
