"""`shrinkflow quantize` for PyTorch: one float model -> one quantized artefact.

- static_int8: PT2E post-training quantization, activations calibrated on
  ``quantize.calibration_batches`` training batches (see ``pt2e``);
- dynamic_int8: PT2E dynamic quantization of the linear layers;
- qat_int8: PT2E quantization-aware training, ``quantize.qat.epochs`` of fake-quantized
  fine-tuning (``train.fit``: resumable, best-on-val epoch kept), then conversion; distilled
  from the float baseline in ``teacher_dir`` when ``finetune.distill`` is set;
- fixed_w<bits>: fixed-point weights (see ``fixed_point``).

A pruned model's zeros survive: int8 and fixed-point weights are symmetric (zero maps to code
0), and QAT holds every zero weight at zero as fine-tuning does.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch import pt2e, pt2e_archive
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_fixed_point
from shrinkflow.backends.torch.distill import load_teacher, teacher_point
from shrinkflow.backends.torch.resume_state import job_fingerprint, resumable_run_id
from shrinkflow.backends.torch.tensors import normalize, to_device_tensors
from shrinkflow.backends.torch.train import fit
from shrinkflow.data.prepared import PreparedData, check_fits
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.quantization import QuantMethod, calibration_count, parse_quant_method
from shrinkflow.training import TrainResult, batch_bounds
from shrinkflow.training.distill import distill_plan
from shrinkflow.training.fast_path import without_fast_path


def quantize_fingerprint(
    cfg: dict, method: str, model_dir: Path, data: PreparedData, teacher_dir: Path | None = None
) -> str:
    """Hash of what decides a QAT run: its resume state is reused only on a match. A distilled
    run's includes its teacher's file."""
    point = {"qmethod": method, **teacher_point(distill_plan(cfg, teacher_dir))}
    return job_fingerprint("quantize", cfg, point, data, model_dir)


def resumable_quantize_run_id(
    cfg: dict,
    method: str,
    model_dir: Path,
    data: PreparedData,
    resume_dir: Path,
    teacher_dir: Path | None = None,
) -> str | None:
    """Only QAT trains (and resumes); the other methods take seconds."""
    if parse_quant_method(method).family != "qat":
        return None
    fingerprint = quantize_fingerprint(cfg, method, model_dir, data, teacher_dir)
    return resumable_run_id(resume_dir, fingerprint)


def calibration_batches(cfg: dict, data: PreparedData, spec: dict) -> list[torch.Tensor]:
    """The first ``quantize.calibration_batches`` training batches, in the split's order.

    Un-augmented training images: the activation ranges a deployed model meets. Fewer batches
    exist when the split is small; all of them are then used.
    """
    wanted = calibration_count(cfg, len(data.train))
    bounds = batch_bounds(len(data.train), int(cfg["train"]["batch_size"]))[:wanted]
    index = np.asarray(data.train)
    return [normalize(data.images[index[a:b]], spec["mean"], spec["std"]) for a, b in bounds]


@dataclass(frozen=True)
class _Job:
    """One quantize job's inputs, as ``quantize_model`` received them."""

    cfg: dict
    method: QuantMethod
    model_dir: Path
    data: PreparedData
    context: JobContext
    teacher_dir: Path | None = None


def quantize_model(
    cfg: dict,
    method: str,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    teacher_dir: Path | None = None,
) -> dict[str, float | int | str]:
    """Quantize the float model in ``model_dir`` with ``method``; write it into ``context.out_dir``.
    Only QAT reads ``teacher_dir`` (its teacher, when ``finetune.distill`` is set).

    Returns facts for the run: the artefact's file name, the calibration batches seen, the
    layers quantized, the val top-1 of the quantized model (computed on the reference int8
    graph, for the record; ``evaluate`` measures the saved artefact) and the seconds taken.
    """
    started = time.perf_counter()
    job = _Job(cfg, parse_quant_method(method), Path(model_dir), data, context, teacher_dir)
    model, spec = load_model(model_dir)  # validates the input before anything is written
    check_fits(spec, data, job.model_dir / MODEL_FILE)
    if job.method.family == "fixed":
        save_fixed_point(model, spec, job.method.bits, job.context.out_dir)
        facts: dict = {"artifact": MODEL_FILE, "bits": job.method.bits}
        facts["quantized_layers"] = _count_layers(model, (nn.Conv2d, nn.Linear))
        reloaded, _ = load_model(job.context.out_dir)
        facts["val_top1"] = _val_top1(reloaded, cfg, data)
    else:
        facts = _quantize_pt2e(job, model, spec)
    facts["seconds"] = time.perf_counter() - started
    return facts


def _quantize_pt2e(job: _Job, model: nn.Module, spec: dict) -> dict:
    name, family = job.method.name, job.method.family
    if family == "dynamic" and _count_layers(model, (nn.Linear,)) == 0:
        raise ShrinkflowError(
            f"--method {name}: model {spec['arch']} has no nn.Linear layer, the only layers "
            "dynamic int8 quantizes (use static_int8)"
        )
    batches = calibration_batches(job.cfg, job.data, spec)
    facts: dict = {"artifact": pt2e_archive.PT2_FILE, "bits": 8}
    if family == "qat":
        prepared, result = _train_qat(job, model, spec)
        facts.update(qat_epochs=result.epochs, qat_best_epoch=result.best_epoch)
        facts["qat_resumed_from_epoch"] = result.resumed_from_epoch
        facts["qat_best_val_top1"] = result.best_val_top1
    else:
        prepared = pt2e.prepare(model, spec, family)
        pt2e.calibrate(prepared, batches)
        facts["calibration_batches"] = len(batches)
        facts["calibration_images"] = sum(len(b) for b in batches)
    converted = pt2e.convert(prepared)
    facts["quantized_layers"] = _count_int8_weights(converted)
    if facts["quantized_layers"] == 0:
        raise ShrinkflowError(f"--method {name}: no layer of {spec['arch']} was quantized")
    pt2e_archive.save(converted, spec, job.context.out_dir)
    facts["val_top1"] = _val_top1(converted, job.cfg, job.data)
    return facts


def _train_qat(job: _Job, model: nn.Module, spec: dict) -> tuple[torch.fx.GraphModule, TrainResult]:
    """Fake-quantized fine-tuning of ``model``: the trained prepared graph (its best-on-val
    epoch) and the training record.

    ``fit`` saves the model it trained; here that file is the converted int8 program, which
    the caller writes, so ``fit`` gets a ``save`` that writes nothing.
    """
    qat = job.cfg["quantize"]["qat"]
    plan = distill_plan(job.cfg, job.teacher_dir)
    # The float teacher stays a plain module; only the student is prepared for fake quantization.
    teacher = load_teacher(plan, job.data)
    prepared = pt2e.prepare(model, spec, "qat")
    # Pruned weights are zero in the float model and must stay zero through QAT's updates.
    masks = {
        name: p != 0
        for name, p in prepared.named_parameters()
        if p.ndim > 1 and not bool((p != 0).all())
    }

    def keep_zeros(step: int) -> None:
        with torch.no_grad():
            for name, p in prepared.named_parameters():
                if name in masks:
                    p.mul_(masks[name])

    say(f"quantize {job.method.name}: {qat['epochs']} epoch(s) of quantization-aware training")
    # Observers switch on tensors read on the host (no CUDA graph) and fake quantization is
    # float32 arithmetic (no autocast).
    train_cfg = without_fast_path(job.cfg, f"quantize {job.method.name}", "fake quantization")
    result = fit(
        prepared,
        train_cfg,
        job.data,
        epochs=int(qat["epochs"]),
        lr=float(qat["lr"]),
        warmup_epochs=0,
        fingerprint=quantize_fingerprint(
            job.cfg, job.method.name, job.model_dir, job.data, job.teacher_dir
        ),
        **job.context.fit_kwargs(),
        spec=spec,
        step_hook=keep_zeros if masks else None,
        lr_key="quantize.qat.lr",
        # Training may run on CUDA (fake quantization is ordinary tensor arithmetic); the
        # int8 graph it converts to runs on x86 CPUs, so the result comes back to the CPU.
        save=lambda trained, folder: None,
        teacher=teacher,
    )
    return prepared.cpu(), result


def _count_layers(model: nn.Module, kinds: tuple[type, ...]) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


def _count_int8_weights(converted: torch.fx.GraphModule) -> int:
    """How many int8 weight tensors (one per quantized conv or linear layer) the graph holds."""
    targets = [n.target for n in converted.graph.nodes if n.op == "get_attr"]
    tensors = [functools.reduce(getattr, t.split("."), converted) for t in targets]
    return sum(isinstance(t, torch.Tensor) and t.dtype == torch.int8 for t in tensors)


@torch.no_grad()
def _val_top1(model: nn.Module, cfg: dict, data: PreparedData) -> float:
    """Top-1 on the val split, without switching modes (an exported graph has none to switch)."""
    x, y = to_device_tensors(data, "val", "cpu")
    if len(y) == 0:
        return float("nan")
    size = int(cfg["train"]["batch_size"])
    correct = sum(
        int((model(x[i : i + size]).argmax(1) == y[i : i + size]).sum())
        for i in range(0, len(y), size)
    )
    return correct / len(y)
