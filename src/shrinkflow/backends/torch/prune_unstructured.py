"""`shrinkflow prune` for the unstructured methods: magnitude (L1) pruning of single weights.

``l1_unstructured`` prunes the trained baseline once; ``gradual_polynomial`` and
``gradual_constant`` re-train the baseline while ``gradual.GradualPruner`` raises the sparsity on
a schedule. Either way the saved model holds plain weights with the pruned ones exactly zero (no
``weight_orig`` + ``weight_mask`` pairs), and every fact returned is measured on the saved file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.evaluate import count_params
from shrinkflow.backends.torch.models import output_layer_name
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import (
    evaluate_split,
    fingerprint_of,
    fit,
    resolve_device,
    steps_per_epoch,
)
from shrinkflow.data.prepared import PreparedData, sha256_file
from shrinkflow.errors import ShrinkflowError

METHODS = ("l1_unstructured", "gradual_polynomial", "gradual_constant")
SCOPES = ("global", "layer")
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


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ShrinkflowError(f"prune.sparsities: {sparsity} is not in [0, 1)")


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ShrinkflowError(f"prune.scope: {scope!r} is not one of {', '.join(SCOPES)}")


def gradual_fingerprint(
    cfg: dict, method: str, sparsity: float, model_dir: Path, data: PreparedData
) -> str:
    """Hash of what decides a gradual run. Of ``prune`` only the keys the run reads count, so
    adding a value to the sweep lists does not discard the resume states of other branches."""
    p = cfg["prune"]
    return fingerprint_of(
        {
            "stage": "prune",
            "method": method,
            "sparsity": float(sparsity),
            "prune": {k: p[k] for k in ("scope", "exclude", "gradual")},
            "train": cfg["train"],
            "seed": cfg["seed"],
            "data": data.fingerprint,
            "model": sha256_file(Path(model_dir) / MODEL_FILE),
        }
    )


def prune_unstructured(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None,
    sensitivity_dir: Path | None,
) -> dict[str, float | int]:
    """Prune the model in ``model_dir`` with ``method`` to ``sparsity``; save it to ``out_dir``.

    ``sensitivity_dir`` is unused: the signature is shared by every prune family. Returns
    ``measured_sparsity`` (zeros over the pruned layers, counted in the saved file),
    ``val_top1``, ``params`` and ``nonzero_params`` of the saved model; the gradual methods add
    ``epochs``, ``best_epoch`` and ``resumed_from_epoch``.
    """
    if method not in METHODS:
        raise ShrinkflowError(f"prune.methods: {method!r} is not one of {', '.join(METHODS)}")
    check_sparsity(sparsity)
    p, dev = cfg["prune"], resolve_device("auto")
    model, spec = load_model(model_dir, dev)
    facts: dict[str, float | int] = {}
    if method == "l1_unstructured":
        apply_masks(model, magnitude_masks(model, sparsity, p["scope"], p["exclude"]))
        save_model(model, spec, Path(out_dir))
    else:
        facts = _prune_gradually(
            cfg,
            method,
            sparsity,
            model,
            spec,
            model_dir,
            data,
            dev,
            out_dir=out_dir,
            resume_dir=resume_dir,
            on_epoch=on_epoch,
            run_id=run_id,
        )
    return {**_saved_facts(cfg, out_dir, data, dev), **facts}


def _prune_gradually(
    cfg: dict,
    method: str,
    sparsity: float,
    model: nn.Module,
    spec: dict,
    model_dir: Path,
    data: PreparedData,
    dev: torch.device,
    *,
    out_dir: Path,
    resume_dir: Path,
    on_epoch: Callable[[int, dict[str, float]], None],
    run_id: str | None,
) -> dict[str, int]:
    """Re-train under the schedule; the saved epoch is the best one AT the target sparsity.

    Only epochs that end after the schedule's last mask update compete for best-on-val: an
    earlier epoch carries fewer zeros, so it would often win on accuracy and then be either
    saved below the target or cut to it afterwards without its accuracy ever measured. After
    the last update the masks no longer change and are re-applied after every step, so every
    competing epoch is already exactly at the target.
    """
    # Imported here: gradual builds on this module's mask functions.
    from shrinkflow.backends.torch.gradual import GradualPruner

    p, g = cfg["prune"], cfg["prune"]["gradual"]
    epochs, per_epoch = int(g["epochs"]), steps_per_epoch(cfg, data)
    pruner = GradualPruner(
        model,
        method.removeprefix("gradual_"),
        sparsity,
        epochs * per_epoch,
        g,
        p["scope"],
        p["exclude"],
    )

    def with_sparsity(epoch: int, metrics: dict[str, float]) -> None:
        on_epoch(epoch, {**metrics, "sparsity": pruner.sparsity})

    result = fit(
        model,
        cfg,
        data,
        epochs=epochs,
        lr=float(g["lr"]),
        warmup_epochs=0,
        out_dir=Path(out_dir),
        resume_dir=Path(resume_dir),
        fingerprint=gradual_fingerprint(cfg, method, sparsity, model_dir, data),
        on_epoch=with_sparsity,
        run_id=run_id,
        spec=spec,
        step_hook=pruner,
        select_from_epoch=math.ceil(pruner.end / per_epoch),
        device=str(dev),
        lr_key="prune.gradual.lr",
    )
    return {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
    }


def _saved_facts(
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
