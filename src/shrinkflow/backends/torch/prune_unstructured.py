"""`shrinkflow prune` for ``l1_unstructured``, and the magnitude masks of every unstructured method.

``l1_unstructured`` prunes the trained baseline once; ``gradual_polynomial`` and
``gradual_constant`` (``gradual``) re-train the baseline while ``gradual.GradualPruner`` raises
the sparsity on a schedule with this module's masks. Either way the saved model holds plain
weights with the pruned ones exactly zero (no ``weight_orig`` + ``weight_mask`` pairs), and
every fact returned is measured on the saved file (``saved_facts``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from shrinkflow.backends.base import JobContext, check_scope, check_sparsity
from shrinkflow.backends.torch.artifact import load_model, save_model
from shrinkflow.backends.torch.device import resolve_device
from shrinkflow.backends.torch.evaluate import count_params
from shrinkflow.backends.torch.models import output_layer_name
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.trainer import evaluate_split
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

METHODS = ("l1_unstructured",)  # the gradual methods: gradual.METHODS
PRUNABLE = (nn.Conv2d, nn.Linear)
OUTPUT = "output"  # the exclusion pattern standing for models.output_layer_name(model)
_LISTED = 8  # layer names quoted in an error message before the rest are only counted


def prunable_modules(model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers whose qualified names match no pattern of ``exclude``.

    Patterns are case-sensitive fnmatch patterns (``layer1.*``, ``*.downsample.0``); ``output``
    stands for the model's output layer. A pattern that matches no conv or linear layer is an
    error, because a typo would otherwise silently prune the layer it meant to protect.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    names = [n for n, _ in layers]
    patterns = []
    for pattern in exclude:
        if pattern == OUTPUT:
            patterns.append(output_layer_name(model))
        elif any(fnmatchcase(n, pattern) for n in names):
            patterns.append(pattern)
        else:
            shown = ", ".join(names[:_LISTED])
            more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
            raise ShrinkflowError(
                f"prune.exclude: {pattern!r} matches no conv or linear layer "
                f"(layers: {shown}{more})"
            )
    return [(n, m) for n, m in layers if not any(fnmatchcase(n, p) for p in patterns)]


def magnitude_masks(
    model: nn.Module, sparsity: float, scope: str, exclude: list[str]
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = kept) that zero the ``sparsity`` share of smallest |w|.

    ``scope`` "global" ranks the weights of all prunable layers together (layers with small
    weights lose more), "layer" prunes every layer to ``sparsity``. Keys are module names.
    """
    check_sparsity(sparsity)
    check_scope(scope)
    return layer_masks(prunable_modules(model, exclude), sparsity, scope)


def layer_masks(
    modules: list[tuple[str, nn.Module]], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """``magnitude_masks`` for an already selected list of (name, layer)."""
    if not modules:
        raise ShrinkflowError("prune.exclude: excludes every conv and linear layer")
    # torch's L1Unstructured ranks |w| and rounds sparsity * numel, as global_unstructured does;
    # it is called on plain tensors so that the model never carries weight_orig/weight_mask.
    method = torch_prune.L1Unstructured(amount=float(sparsity))
    with torch.no_grad():
        weights = [m.weight.detach().contiguous() for _, m in modules]
        if scope == "layer":
            keep = [method.compute_mask(w, torch.ones_like(w, dtype=torch.bool)) for w in weights]
        else:
            flat = torch.cat([w.reshape(-1) for w in weights])
            kept = method.compute_mask(flat, torch.ones_like(flat, dtype=torch.bool))
            parts = kept.split([w.numel() for w in weights])
            keep = [k.view_as(w) for k, w in zip(parts, weights, strict=True)]
    return {name: k for (name, _), k in zip(modules, keep, strict=True)}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero, in place, every weight whose keep-mask is False; the model stays a plain model."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            weight = modules[name].weight
            weight.masked_fill_(keep.to(weight.device).logical_not(), 0.0)


def masks_from_zeros(model: nn.Module, exclude: list[str]) -> dict[str, torch.Tensor]:
    """The keep-masks of a pruned model's prunable layers: True where the weight is not zero."""
    return {n: m.weight.detach() != 0 for n, m in prunable_modules(model, exclude)}


def sparsity_of(model: nn.Module, names: list[str]) -> float:
    """Share of zero weights over the layers ``names``."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    total = sum(w.numel() for w in weights)
    return 1.0 - sum(int(torch.count_nonzero(w)) for w in weights) / total


def prune_unstructured(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Prune the model in ``model_dir`` once to ``sparsity``; save it to ``context.out_dir``.

    Only the context's ``out_dir`` is used, and not ``sensitivity_dir``: the signature is
    shared by every prune family (``prune.prune_model``). Returns ``saved_facts``.
    """
    if method not in METHODS:
        raise ShrinkflowError(f"prune.methods: {method!r} is not one of {', '.join(METHODS)}")
    check_sparsity(sparsity)
    p, dev = cfg["prune"], resolve_device("auto")
    model, spec = load_model(model_dir, dev)
    apply_masks(model, magnitude_masks(model, sparsity, p["scope"], p["exclude"]))
    save_model(model, spec, Path(context.out_dir))
    return saved_facts(cfg, context.out_dir, data, dev)


def saved_facts(
    cfg: dict, out_dir: Path, data: PreparedData, dev: torch.device
) -> dict[str, float | int]:
    """Sparsity, size and val top-1 of the model as saved in ``out_dir``."""
    model, _ = load_model(out_dir, dev)
    pruned = [n for n, _ in prunable_modules(model, cfg["prune"]["exclude"])]
    counts = count_params(model)
    _, val_top1 = evaluate_split(
        model, *to_device_tensors(data, "val", dev), int(cfg["train"]["batch_size"]), False
    )
    return {
        "measured_sparsity": sparsity_of(model, pruned),
        "val_top1": val_top1,
        "params": counts["params"],
        "nonzero_params": counts["nonzero_params"],
    }
