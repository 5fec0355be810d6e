"""Helpers shared by the PyTorch pruning, sensitivity, fine-tuning and quantization tests:
their params, the trained digits baseline, and the quadrant data of the structured tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from data_fixtures import TRAIN, digits_data
from torch import nn
from torch_fixtures import TRAIN_CFG, fixed_threads, one_thread  # noqa: F401 (fixed_threads: re-exported)

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch import prune_structured as ps
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.train import train_model
from shrinkflow.data.prepared import PreparedData
from shrinkflow.training import model_spec

# Two baseline epochs reach ~0.82 val top-1 on digits: accurate enough that pruning visibly
# costs accuracy and fine-tuning visibly recovers it.
PRUNE_CFG = {
    **copy.deepcopy(TRAIN_CFG),
    "train": {**TRAIN_CFG["train"], "epochs": 2},
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
    "finetune": {"epochs": 2, "lr": 0.01, "distill": None},
}


def with_prune(**changes) -> dict:
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["prune"].update(changes)
    return cfg


def with_gradual(**changes) -> dict:
    cfg = copy.deepcopy(PRUNE_CFG)
    cfg["prune"]["gradual"].update(changes)
    return cfg


def train_baseline(root: Path) -> tuple[Path, PreparedData]:
    """A resnet20 trained for two epochs on the 8x8 digits, saved in ``root/baseline``.

    The tests read it through conftest's session fixture ``torch_digits_baseline``: trained
    once per session (per xdist worker), never changed (a test that alters it copies it)."""
    data = digits_data()
    out = root / "baseline"
    out.mkdir()
    with one_thread():
        train_model(
            PRUNE_CFG,
            "resnet20",
            data,
            JobContext(out, root / "resume"),
            device="cpu",
        )
    return out, data


def saved_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / MODEL_FILE, weights_only=True)["state_dict"]


def conv_linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The conv and linear weights of a saved resnet20 (the only tensors with 2+ dimensions)."""
    return {k: v for k, v in saved_weights(folder).items() if v.ndim > 1}


# ---------------------------------------------------------------- structured pruning

CLASSES = 4
STRUCTURED_CFG = {
    "seed": 0,
    "train": dict(TRAIN),
    "prune": {
        "methods": ["structured_l1"],
        "sparsities": [0.5],
        "scope": "global",
        "exclude": ["output"],
        "structured": {
            "rounds": 1,
            "round_epochs": 0,
            "layer_ratios": None,
            "max_layer_ratio": 0.9,
        },
    },
    "finetune": {"epochs": 1, "lr": 0.01, "distill": None},
    "sensitivity": {"ratios": [0.25, 0.5, 0.75], "max_drop": 0.02},
}


def make_cfg(scope: str = "global", **structured) -> dict:
    """``STRUCTURED_CFG`` with ``scope``, and ``structured`` changed in ``prune.structured``."""
    cfg = copy.deepcopy(STRUCTURED_CFG)
    cfg["prune"]["scope"] = scope
    cfg["prune"]["structured"].update(structured)
    return cfg


def quadrant_data(n: int = 240, seed: int = 0) -> PreparedData:
    """8x8 greyscale noise with one bright quadrant; the class is which quadrant."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 60, (n, 8, 8, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 2)
        images[i, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4, 0] += 150
    index = np.arange(n)
    return PreparedData(
        images=images,
        labels=labels.astype(np.int64),
        train=index[: n // 2],
        val=index[n // 2 : 3 * n // 4],
        test=index[3 * n // 4 :],
        classes=[f"q{i}" for i in range(CLASSES)],
        mean=(0.3,),
        std=(0.3,),
        manifest={"fingerprint": f"quadrants-{n}-{seed}"},
    )


QUADRANTS = quadrant_data()


def save_baseline(folder: Path, arch: str = "resnet20", model: nn.Module | None = None) -> Path:
    """A freshly initialised (or the given) ``arch`` saved as a baseline model folder."""
    if model is None:
        torch.manual_seed(0)
        model = create_model(arch, CLASSES, in_channels=1, image_size=8)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, model_spec(arch, QUADRANTS), folder)
    return folder


def prune_structured(
    tmp_path: Path,
    cfg: dict,
    sparsity: float,
    method: str = "structured_l1",
    baseline: Path | None = None,
    sensitivity_dir: Path | None = None,
) -> tuple[dict, nn.Module, list]:
    """Run prune_structured from ``baseline`` (default: a fresh resnet20) on ``QUADRANTS``;
    return the facts, the pruned model and the round metrics passed to on_epoch."""
    baseline = baseline or save_baseline(tmp_path / "baseline")
    out = tmp_path / f"out-{method}-{sparsity}"
    out.mkdir(parents=True)
    rounds = []
    facts = ps.prune_structured(
        cfg,
        method,
        sparsity,
        baseline,
        QUADRANTS,
        JobContext(out, tmp_path / "resume", lambda step, metrics: rounds.append((step, metrics))),
        sensitivity_dir,
    )
    model, _ = load_model(out)
    return facts, model, rounds


def out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, ps.PRUNABLE)}


def groups_of(model: nn.Module) -> list[ps.LayerGroup]:
    return ps.layer_groups(model, torch.zeros(1, 1, 8, 8), ps.ignored_layers(model, ["output"]))


def group_ratios(baseline: nn.Module, pruned: nn.Module) -> dict[str, float]:
    """The share of filters each layer group of ``baseline`` lost in ``pruned``."""
    after = out_channels(pruned)
    return {g.name: 1 - after[g.name] / g.channels for g in groups_of(baseline)}
