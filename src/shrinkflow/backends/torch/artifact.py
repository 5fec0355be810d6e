"""The deployable model file of a node: a state dict plus the spec needed to rebuild the model.

The file holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a model file never runs code from it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.backends.torch.models import create_model
from shrinkflow.errors import ShrinkflowError

MODEL_FILE = "model.pt"
FORMAT = "shrinkflow.torch/1"
SPEC_KEYS = ("arch", "num_classes", "in_channels", "image_size", "mean", "std", "classes")


def save_model(model: nn.Module, spec: dict[str, Any], folder: Path) -> Path:
    """Write ``model``'s weights and ``spec`` to ``folder/model.pt`` and return the path.

    Args:
        spec: ``arch`` (registry name), ``num_classes``, ``in_channels``, ``image_size``,
            ``mean``/``std`` (per channel, 0..1 scale) and ``classes``; plain Python types only.
    """
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}")
    # CPU copies make the file loadable on any machine, whichever device trained it.
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(folder) / MODEL_FILE
    torch.save({"format": FORMAT, "spec": dict(spec), "state_dict": state}, path)
    return path


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in ``folder`` (in eval mode, on ``device``) and return its spec."""
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ShrinkflowError(f"{path}: not a readable PyTorch model file ({reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ShrinkflowError(f"{path}: not a shrinkflow model file (expected format {FORMAT})")
    spec = payload.get("spec")
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        raise ShrinkflowError(f"{path}: model spec must hold {', '.join(SPEC_KEYS)}")
    model = create_model(
        spec["arch"],
        spec["num_classes"],
        in_channels=spec["in_channels"],
        image_size=spec["image_size"],
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as e:
        reason = str(e).splitlines()[0]
        raise ShrinkflowError(f"{path}: weights do not fit {spec['arch']} ({reason})") from None
    return model.to(device).eval(), spec
