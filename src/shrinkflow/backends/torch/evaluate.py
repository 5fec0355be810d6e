"""`shrinkflow evaluate` for PyTorch: accuracy, size, MACs, latency, throughput and memory.

Every figure is measured on the saved model file, never taken from the stage that produced it:
sparsity is counted from the loaded weights and the sizes are the bytes on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shrinkflow import metrics
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model
from shrinkflow.backends.torch.sparse import sparse_bytes
from shrinkflow.backends.torch.tensors import normalize
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

# Accuracy batch: in eval mode the logits do not depend on it (batch norm uses running
# statistics); 256 keeps memory small for CIFAR-size inputs while amortising per-call overhead.
ACCURACY_BATCH = 256

# The layers pruning acts on. Biases and batch-norm parameters are never pruned, so counting
# them would dilute measured sparsity below the target the pruning stage aimed for.
PRUNABLE = (nn.Conv2d, nn.Linear)


def _device(cfg: dict) -> torch.device:
    name = cfg["evaluate"]["device"]
    if name not in ("cpu", "cuda"):
        raise ShrinkflowError(f"evaluate.device: {name!r} is not one of cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShrinkflowError(
            "evaluate.device: 'cuda' requested but no CUDA device is available; use cpu"
        )
    return torch.device(name)


def _check_fits(spec: dict, data: PreparedData, model_file: Path) -> None:
    """Refuse to score a model on data with another shape or another class list."""
    wanted = (spec["in_channels"], spec["image_size"], list(spec["classes"]))
    found = (data.channels, data.image_size, list(data.classes))
    if wanted != found:
        raise ShrinkflowError(
            f"{model_file}: model expects {wanted[0]}-channel {wanted[1]}px images of "
            f"{len(wanted[2])} classes, prepared data has {found[0]}-channel {found[1]}px "
            f"images of {len(found[2])} classes (or other class names)"
        )
    for split in ("val", "test"):
        if len(getattr(data, split)) == 0:
            raise ShrinkflowError(f"prepared data: the {split} split is empty")


def count_params(model: nn.Module) -> dict[str, int | float]:
    """``params``, ``nonzero_params``, the conv/linear weight counts (``prunable_weights``,
    ``prunable_nonzero``) and ``measured_sparsity``: the zero share of those weights."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    kept = sum(int(torch.count_nonzero(w)) for w in weights)
    return {
        "params": params,
        "nonzero_params": nonzero,
        "prunable_weights": total,
        "prunable_nonzero": kept,
        "measured_sparsity": 1.0 - kept / total if total else 0.0,
    }


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on an input of ``input_shape``.

    torch's own FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and
    matrix products (the layers that dominate a CNN; biases, norms and activations are left
    out, the usual convention of published MAC figures). Zeroed weights still count: MACs
    describe the dense computation a standard runtime performs.
    """
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(input_shape, device=device))
    return counter.get_total_flops() // 2


def _logits(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        out = [model(images[i : i + ACCURACY_BATCH]) for i in range(0, len(images), ACCURACY_BATCH)]
    return torch.cat(out).float().cpu().numpy()


def _accuracy(model: nn.Module, data: PreparedData, spec: dict, device: torch.device) -> dict:
    scores = {}
    for split in ("test", "val"):
        index = getattr(data, split)
        images = normalize(data.images[index], spec["mean"], spec["std"], device)
        scores[split] = metrics.topk_accuracy(_logits(model, images), data.labels[index])
    return {"top1": scores["test"][1], "top5": scores["test"][5], "val_top1": scores["val"][1]}


def _timing_batch(data: PreparedData, spec: dict, batch: int, device: torch.device) -> torch.Tensor:
    """The first ``batch`` test images (cycled when the split is smaller), normalized."""
    index = np.resize(data.test, batch)
    return normalize(data.images[index], spec["mean"], spec["std"], device)


def _peak_memory(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """Memory one forward pass adds on top of the loaded model and its input, in MiB."""
    with torch.inference_mode():
        if x.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            model(x)
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20, "cuda_max_allocated"
        with metrics.PeakMemory() as peak:
            model(x)
        return peak.peak_mb, peak.method


def evaluate_model(cfg: dict, model_dir: Path, data: PreparedData) -> dict[str, float | int | str]:
    """Measure the model saved in ``model_dir`` on ``data`` as ``cfg['evaluate']`` says.

    Returns a flat dict whose keys follow ``metrics.SUMMARY_COLUMNS`` where they overlap, plus
    ``val_top1``, ``latency_ms_b1_p90``, ``latency_batch``/``throughput_batch`` (the batch
    sizes actually timed), ``peak_mem_method``, ``threads``, ``device`` and
    ``sparse_bytes``/``sparse_gzip_bytes`` (the weights in a sparse encoding, see ``sparse``).
    """
    device = _device(cfg)
    settings = cfg["evaluate"]
    model_file = Path(model_dir) / MODEL_FILE
    model, spec = load_model(model_dir, device)
    _check_fits(spec, data, model_file)
    model.eval()

    latency_batch = settings["batch_sizes"][0]
    throughput_batch = max(settings["batch_sizes"])
    latency_x = _timing_batch(data, spec, latency_batch, device)
    throughput_x = _timing_batch(data, spec, throughput_batch, device)

    # Memory first: earlier passes leave freed blocks in the allocator's pools, which a later
    # pass reuses without raising the resident size, so it would seem to need nothing.
    peak_mb, peak_method = _peak_memory(model, throughput_x)
    result: dict[str, float | int | str] = {**_accuracy(model, data, spec, device)}
    result.update(count_params(model))
    result["macs"] = count_macs(model, (1, *latency_x.shape[1:]))
    result["size_bytes"] = metrics.file_bytes(model_file)
    result["gzip_bytes"] = metrics.gzip_bytes(model_file)
    # What the zeros buy on disk: the dense file does not shrink, a sparse encoding does.
    result["sparse_bytes"], result["sparse_gzip_bytes"] = sparse_bytes(model.state_dict())

    sync: Callable[[], None] | None = torch.cuda.synchronize if device.type == "cuda" else None

    def timings(x: torch.Tensor) -> list[float]:
        with torch.inference_mode():
            return metrics.time_calls(
                lambda: model(x), settings["warmup"], settings["repeats"], sync
            )

    latency = metrics.LatencyStats.from_seconds(timings(latency_x))
    throughput = (
        latency
        if throughput_batch == latency_batch
        else metrics.LatencyStats.from_seconds(timings(throughput_x))
    )
    result.update(
        latency_ms_b1=latency.median_ms,
        latency_ms_b1_p90=latency.p90_ms,
        latency_batch=latency_batch,
        throughput_ips=throughput_batch / (throughput.median_ms / 1e3),
        throughput_batch=throughput_batch,
        peak_mem_mb=peak_mb,
        peak_mem_method=peak_method,
        threads=torch.get_num_threads(),
        device=device.type,
    )
    return result
