"""Helpers shared by the PyTorch pruning and fine-tuning tests: params and a trained baseline."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from test_torch_train import CFG, digits_data, fixed_threads  # noqa: F401 (re-exported)

from shrinkflow.backends.torch.artifact import MODEL_FILE
from shrinkflow.backends.torch.train import train_model
from shrinkflow.data.prepared import PreparedData

# Two baseline epochs reach ~0.82 val top-1 on digits: accurate enough that pruning visibly
# costs accuracy and fine-tuning visibly recovers it.
PRUNE_CFG = {
    **copy.deepcopy(CFG),
    "train": {**CFG["train"], "epochs": 2},
    "prune": {
        "scope": "global",
        "exclude": ["output"],
        "gradual": {
            "epochs": 2,
            "lr": 0.01,
            "begin_fraction": 0.0,
            "end_fraction": 0.7,
            "frequency": 10,
            "initial_sparsity": 0.0,
        },
    },
    "finetune": {"epochs": 2, "lr": 0.01},
}

# Other jobs may share the 2 CI cores; more threads than free cores makes torch's CPU kernels
# spin and run many times slower, and one thread keeps runs bit-exact.
THREADS = 1


def with_prune(**changes) -> dict:
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["prune"].update(changes)
    return cfg


def with_gradual(**changes) -> dict:
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["prune"]["gradual"].update(changes)
    return cfg


def train_baseline(root: Path) -> tuple[Path, PreparedData]:
    """A resnet20 trained for two epochs on the 8x8 digits, saved in ``root/baseline``."""
    data = digits_data()
    out = root / "baseline"
    out.mkdir()
    train_model(PRUNE_CFG, "resnet20", data, out, root / "resume", lambda e, m: None, device="cpu")
    return out, data


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / MODEL_FILE, weights_only=True)["state_dict"]


def conv_linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The conv and linear weights of a saved resnet20 (the only tensors with 2+ dimensions)."""
    return {k: v for k, v in saved_weights(folder).items() if v.ndim > 1}
