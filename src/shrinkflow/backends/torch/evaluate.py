"""`shrinkflow evaluate` for PyTorch: accuracy, size, MACs, latency, throughput and memory.

Every figure is measured on the saved model file, never taken from the stage that produced it:
sparsity is counted from the loaded weights and the sizes are the bytes on disk.

Three kinds of file are measured alike: a float model (``model.pt``), a fixed-point one (the
same file name; it runs as the float model its integer weights describe), and an int8
``torch.export`` program (``model.pt2``), which runs on oneDNN's int8 kernels after
``pt2e.lower`` (once per batch size timed). All three run in one runtime, torch's
(``RUNTIME``; the int8 program on its oneDNN kernels). With a ``reference`` model (the float
model a quantized one came from) both are timed in the same process, so their speeds compare,
like with like.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shrinkflow import measure, metrics
from shrinkflow.backends.torch.artifact import INT8_FILE, MODEL_FILE, load_model
from shrinkflow.backends.torch.stored_weights import encoding_sizes
from shrinkflow.backends.torch.tensors import normalize
from shrinkflow.data.prepared import PreparedData, check_fits
from shrinkflow.errors import ShrinkflowError

Forward = Callable[[torch.Tensor], torch.Tensor]
# Accuracy batch of float models: in eval mode the logits do not depend on it (batch norm uses
# running statistics); 256 keeps memory small for CIFAR-size inputs while amortising per-call
# overhead. An int8 program scores in batches of the throughput batch size, for which it is
# lowered anyway.
ACCURACY_BATCH = 256

# The layers pruning acts on. Biases and batch-norm parameters are never pruned, so counting
# them would dilute measured sparsity below the target the pruning stage aimed for.
PRUNABLE = (nn.Conv2d, nn.Linear)

# What runs every kind of file here, the ``runtime`` evaluate reports: float and fixed-point
# models in eager torch, int8 programs in torch with oneDNN's int8 kernels.
RUNTIME = "torch"


def _device(cfg: dict) -> torch.device:
    name = cfg["evaluate"]["device"]
    if name not in ("cpu", "cuda"):
        raise ShrinkflowError(f"evaluate.device: {name!r} is not one of cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ShrinkflowError(
            "evaluate.device: 'cuda' requested but no CUDA device is available; use cpu"
        )
    return torch.device(name)


LayerCount = dict[str, int | str]  # one entry of layer_sparsity: layer, weights, nonzero
Counts = dict[str, int | float | list[LayerCount]]


def tally(tensors: Iterable[torch.Tensor], layers: Iterable[tuple[str, torch.Tensor]]) -> Counts:
    """``count_params``' figures from a model's parameter tensors and its named conv/linear
    weights.

    Each weight becomes one ``layer_sparsity`` entry (``layer``, ``weights``, ``nonzero``), in
    the order given, and the prunable totals are summed from those entries, so the per-layer
    list and the totals cannot disagree.
    """
    every = list(tensors)
    per_layer: list[LayerCount] = [
        {"layer": name, "weights": w.numel(), "nonzero": int(torch.count_nonzero(w))}
        for name, w in layers
    ]
    total = sum(int(entry["weights"]) for entry in per_layer)
    kept = sum(int(entry["nonzero"]) for entry in per_layer)
    return {
        "params": sum(t.numel() for t in every),
        "nonzero_params": sum(int(torch.count_nonzero(t)) for t in every),
        "prunable_weights": total,
        "prunable_nonzero": kept,
        "measured_sparsity": 1.0 - kept / total if total else 0.0,
        "layer_sparsity": per_layer,
    }


def count_params(model: nn.Module) -> Counts:
    """``params``, ``nonzero_params``, the conv/linear weight counts (``prunable_weights``,
    ``prunable_nonzero``), ``measured_sparsity`` (the zero share of those weights) and
    ``layer_sparsity``: those counts per layer, named as in ``named_modules()``."""
    weights = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    return tally(model.parameters(), weights)


@dataclass
class Subject:
    """A model file ready to measure: how to run it at a batch size, and its static figures."""

    file: Path
    spec: dict
    forward_at: Callable[[int], Forward]  # batch size -> a callable for that size
    fixed_batch: bool  # whether forward_at(n) takes batches of exactly n images only
    counts: Counts  # count_params' keys
    macs: int


def load_subject(model_dir: Path, device: torch.device) -> Subject:
    """The model in ``model_dir``, whichever of the three file kinds it holds."""
    if (Path(model_dir) / INT8_FILE).is_file():
        return _int8_subject(Path(model_dir), device)
    return _float_subject(Path(model_dir), device)


def _float_subject(model_dir: Path, device: torch.device) -> Subject:
    model, spec = load_model(model_dir, device)
    model.eval()
    return Subject(
        file=model_dir / MODEL_FILE,
        spec=spec,
        forward_at=lambda batch: model,
        fixed_batch=False,
        counts=count_params(model),
        macs=count_macs(model, _input_shape(spec)),
    )


def _int8_subject(model_dir: Path, device: torch.device) -> Subject:
    from shrinkflow.backends.torch import pt2e, pt2e_archive  # torchao: 2.3 s to import

    if device.type != "cpu":
        raise ShrinkflowError(
            f"evaluate.device: {device.type!r}, but {model_dir / INT8_FILE} is an int8 "
            "program for x86 CPUs; evaluate it with evaluate.device cpu"
        )
    program, spec = pt2e_archive.load(model_dir)
    lowered: dict[int, Forward] = {}

    def forward_at(batch: int) -> Forward:
        if batch not in lowered:
            lowered[batch] = pt2e.lower(program, spec, batch)
        return lowered[batch]

    # Every stored tensor but the quantization parameters; the conv and linear weights found
    # by walking the graph, named after the module each op came from.
    counts = tally(pt2e.weight_tensors(program).values(), pt2e.layer_weights(program))
    return Subject(
        file=model_dir / INT8_FILE,
        spec=spec,
        forward_at=forward_at,
        fixed_batch=True,
        counts=counts,
        # The saved (reference) graph runs the same convolutions and matrix products in float.
        macs=count_macs(program.module(), _input_shape(spec)),
    )


def _input_shape(spec: dict) -> tuple[int, int, int, int]:
    return (1, spec["in_channels"], spec["image_size"], spec["image_size"])


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on an input of ``input_shape``.

    torch's own FlopCounterMode counts 2 FLOPs per multiply-accumulate of convolutions and
    matrix products (the layers that dominate a CNN; biases, norms and activations are left
    out, the usual convention of published MAC figures). Zeroed weights still count: MACs
    describe the dense computation a standard runtime performs.
    """
    device = next(iter(model.parameters()), torch.zeros(())).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(input_shape, device=device))
    return counter.get_total_flops() // 2


def logits(subject: Subject, images: torch.Tensor, batch: int) -> np.ndarray:
    """Logits of ``images`` in batches of ``batch``. For a fixed-batch subject the last batch is
    zero-padded, so that a program lowered for one batch size scores a split of any size: in
    eval mode a model's logits for an image do not depend on the rest of its batch."""
    forward = subject.forward_at(batch)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            pad = batch - len(chunk) if subject.fixed_batch else 0
            if pad:
                chunk = torch.cat([chunk, chunk.new_zeros((pad, *chunk.shape[1:]))])
            out.append(forward(chunk)[: batch - pad])
    return torch.cat(out).float().cpu().numpy()


def _accuracy(subject: Subject, data: PreparedData, batch: int, device: torch.device) -> dict:
    spec, scores = subject.spec, {}
    for split in ("test", "val"):
        index = getattr(data, split)
        images = normalize(data.images[index], spec["mean"], spec["std"], device)
        scores[split] = metrics.topk_accuracy(logits(subject, images, batch), data.labels[index])
    return metrics.accuracy_figures(scores["test"], scores["val"], data)


def _timing_batch(data: PreparedData, spec: dict, batch: int, device: torch.device) -> torch.Tensor:
    """The first ``batch`` test images (cycled when the split is smaller), normalized."""
    index = np.resize(data.test, batch)
    return normalize(data.images[index], spec["mean"], spec["std"], device)


def _call_at(subject: Subject, data: PreparedData, device: torch.device) -> measure.CallAt:
    """``subject``'s timed call at a batch size: its forward for that size on the first test
    images (``_timing_batch``)."""

    def call_at(batch: int) -> measure.Call:
        forward = subject.forward_at(batch)
        return functools.partial(forward, _timing_batch(data, subject.spec, batch, device))

    return call_at


def _memory_probe(device: torch.device) -> measure.DevicePeak | None:
    """CUDA's allocator statistics on a GPU; None on the CPU (the process's resident memory)."""
    if device.type != "cuda":
        return None

    def reset() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak() -> int:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    return measure.DevicePeak("cuda_max_allocated", reset, peak)


def evaluate_model(
    cfg: dict, model_dir: Path, data: PreparedData, reference_dir: Path | None = None
) -> dict[str, float | int | str | list[LayerCount]]:
    """Measure the model saved in ``model_dir`` on ``data`` as ``cfg['evaluate']`` says.

    Returns a dict whose keys follow ``metrics.SUMMARY_COLUMNS`` where they overlap, plus
    ``val_top1``, ``test_images``/``val_images`` (the split sizes scored),
    ``prunable_weights``/``prunable_nonzero`` and ``layer_sparsity`` (the same counts per
    conv/linear layer, see ``tally``), ``latency_ms_b1_p90``, ``latency_batch`` (always 1) and
    ``throughput_batch``, ``runtime`` (``RUNTIME``), ``peak_mem_method``, ``threads``,
    ``device``, ``nominal_bytes``/``sparse_bytes``/``sparse_gzip_bytes`` (the weights at their
    precision in a sparse encoding, see ``stored_weights``), and with ``reference_dir``
    ``metrics.reference_comparison``'s keys: the reference is timed in this process, taking
    turns with the model call by call, and being torch's too it is also the same-runtime float
    model (``float_latency_ms_b1``, ``speedup_b1``).
    """
    device = _device(cfg)
    settings = cfg["evaluate"]
    subject = load_subject(Path(model_dir), device)
    check_fits(subject.spec, data, subject.file)
    throughput_batch = max(settings["batch_sizes"])

    # Memory first (see measure.peak_memory): one forward pass at the throughput batch.
    first_pass = _call_at(subject, data, device)(throughput_batch)
    with torch.no_grad():
        peak_mb, peak_method = measure.peak_memory(first_pass, _memory_probe(device))
    accuracy_batch = throughput_batch if subject.fixed_batch else ACCURACY_BATCH
    result: dict[str, float | int | str | list[LayerCount]] = {
        **_accuracy(subject, data, accuracy_batch, device)
    }
    result.update(subject.counts)
    result["macs"] = subject.macs
    result["size_bytes"] = metrics.file_bytes(subject.file)
    result["gzip_bytes"] = metrics.gzip_bytes(subject.file)
    # What the zeros buy on disk: the dense file does not shrink, a sparse encoding does.
    result.update(encoding_sizes(Path(model_dir)))
    reference = None if reference_dir is None else load_subject(Path(reference_dir), device)
    speeds = measure.measure_speeds(
        [_call_at(s, data, device) for s in [subject] + ([reference] if reference else [])],
        settings,
        sync=torch.cuda.synchronize if device.type == "cuda" else None,
        context=torch.no_grad,
    )
    result.update(
        measure.speed_figures(speeds[0], settings),
        peak_mem_mb=peak_mb,
        peak_mem_method=peak_method,
        threads=torch.get_num_threads(),
        device=device.type,
        runtime=RUNTIME,
    )
    if reference is not None:
        result.update(
            metrics.reference_comparison(result, reference.file, speeds[1], RUNTIME, speeds[1])
        )
    return result
