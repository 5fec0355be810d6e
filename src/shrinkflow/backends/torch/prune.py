"""`shrinkflow prune` for PyTorch: every method of ``base.PRUNE_METHODS["torch"]``.

Each family of methods has its module, all with the same signature:

- ``l1_unstructured``: ``prune_unstructured`` (one-shot magnitude masks);
- ``gradual_polynomial``, ``gradual_constant``: ``gradual`` (masks raised on a schedule while
  the baseline re-trains; resumable, see ``gradual_fingerprint``);
- ``structured_l1``, ``structured_random``, ``structured_sensitivity``: ``prune_structured``
  (whole filters removed with Torch-Pruning, so the model shrinks).
"""

from __future__ import annotations

from pathlib import Path

from shrinkflow.backends.base import JobContext, check_prune_method
from shrinkflow.backends.torch import gradual, prune_structured, prune_unstructured
from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.evaluate import count_params
from shrinkflow.backends.torch.gradual import gradual_fingerprint
from shrinkflow.data.prepared import PreparedData

__all__ = ["gradual_fingerprint", "prunable_weights", "prune_model"]


def prunable_weights(model_dir: Path) -> int:
    """How many conv and linear weights the model in ``model_dir`` has."""
    model, _ = load_model(model_dir)
    return int(count_params(model)["prunable_weights"])


def prune_model(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Prune the model in ``model_dir`` with ``method`` to ``sparsity``, into
    ``context.out_dir``.

    Returns the facts of the method's family (see its module): always ``measured_sparsity``
    and ``val_top1``.
    """
    check_prune_method("torch", method, "prune.methods")
    if method in gradual.METHODS:
        prune = gradual.prune_gradually
    elif method in prune_structured.METHODS:
        prune = prune_structured.prune_structured
    else:
        prune = prune_unstructured.prune_unstructured
    return prune(
        cfg,
        method,
        sparsity,
        model_dir,
        data,
        context,
        sensitivity_dir,
    )
