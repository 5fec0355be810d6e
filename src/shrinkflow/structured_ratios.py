"""How much of each layer group structured pruning removes: framework-neutral planning.

Both backends' structured pruning (``backends/<backend>/prune_structured.py``) find their
layer groups their own way (Torch-Pruning's dependency graph; a walk of the Keras graph) and
hand them here as ``LayerGroup``s; this module turns ``prune.scope``,
``prune.structured.layer_ratios`` / ``max_layer_ratio`` or the sensitivity stage's
``ratios.json`` into per-group ratios, with the same rules and messages on both backends.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shrinkflow.errors import ShrinkflowError

if TYPE_CHECKING:  # the report module imports matplotlib, which pruning does not need
    from shrinkflow.sensitivity_report import SensitivityRecord

# The sensitivity stage's per-group ratios for ``structured_sensitivity``.
RATIOS_FILE = "ratios.json"
# Ratios a hair above a limit only through float round-off (a profile scaled to its own mean)
# still count as on the limit.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class LayerGroup:
    name: str  # the member that runs first in a forward pass
    members: tuple[str, ...]  # conv/linear layers whose filters are removed together, run order
    channels: int  # the filters each member has (the same for all of them)


def plan_ratios(
    cfg: dict,
    method: str,
    sparsity: float,
    groups: list[LayerGroup],
    sensitivity_dir: Path | None,
) -> dict[str, float] | None:
    """Each group's filter ratio by group name, or None for one global ranking.

    ``prune.scope`` global ranks all groups' filters together and removes the ``sparsity``
    share of them (a residual group's filters count once, however many members share them);
    layer gives every group ``sparsity``. A profile (``prune.structured.layer_ratios``, or for
    ``structured_sensitivity`` the per-group ratios of the sensitivity stage) overrides the
    scope: the groups are split into ``len(profile)`` consecutive chunks in forward order and
    chunk i gets ``profile[i] * sparsity / mean(profile)``, so that at
    ``sparsity == mean(profile)`` the profile is used as written.
    """
    max_ratio = float(cfg["prune"]["structured"]["max_layer_ratio"])
    if sparsity > max_ratio + _TOLERANCE:
        raise ShrinkflowError(
            f"prune.sparsities: {sparsity} is above prune.structured.max_layer_ratio "
            f"{max_ratio}, which no layer may exceed"
        )
    if not groups:
        raise ShrinkflowError(
            "prune.exclude: no layer group is left to prune (every group holds an excluded layer)"
        )
    if method == "structured_sensitivity":
        if sensitivity_dir is None:
            raise ShrinkflowError("structured_sensitivity needs the sensitivity stage's folder")
        source = str(Path(sensitivity_dir) / RATIOS_FILE)
        measured = load_ratios(sensitivity_dir)
        missing = [g.name for g in groups if g.name not in measured]
        if missing:
            raise ShrinkflowError(
                f"{source}: no ratio for layer group {missing[0]!r} "
                "(re-run sensitivity for this model and prune.exclude)"
            )
        key = f"prune.sparsities: {sparsity} with the ratios of {source}"
        return fill_to_mean({g.name: measured[g.name] for g in groups}, sparsity, max_ratio, key)
    elif cfg["prune"]["structured"]["layer_ratios"] is not None:
        profile = [float(r) for r in cfg["prune"]["structured"]["layer_ratios"]]
        key = f"prune.structured.layer_ratios at sparsity {sparsity}"
    elif cfg["prune"]["scope"] == "global":
        return None
    else:
        return {g.name: float(sparsity) for g in groups}
    ratios = _scaled_profile(profile, sparsity, groups, key)
    for name, ratio in ratios.items():
        if ratio > max_ratio + _TOLERANCE:
            raise ShrinkflowError(
                f"{key}: layer {name!r} would lose {ratio:.2f} of its filters "
                f"(prune.structured.max_layer_ratio {max_ratio})"
            )
    return ratios


def load_ratios(sensitivity_dir: Path) -> dict[str, float]:
    """The per-group ratios a sensitivity run wrote to ``sensitivity_dir/ratios.json``."""
    path = Path(sensitivity_dir) / RATIOS_FILE
    try:
        ratios = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShrinkflowError(f"{path}: not found (run shrinkflow sensitivity first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShrinkflowError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(ratios, dict) or not all(
        isinstance(r, int | float) and not isinstance(r, bool) and 0 <= r < 1
        for r in ratios.values()
    ):
        raise ShrinkflowError(f"{path}: expected an object of layer group -> ratio in [0, 1)")
    return {str(name): float(r) for name, r in ratios.items()}


def fill_to_mean(
    weights: dict[str, float], sparsity: float, cap: float, key: str
) -> dict[str, float]:
    """Per-group ratios proportional to ``weights`` with mean ``sparsity``, none above ``cap``.

    Sensitivity ratios are a ranking of how much each group tolerates, not a plan: scaled to a
    target they often push the robust groups past the cap. Those groups are held at the cap and
    the rest of the target is spread over the others in proportion (water-filling), so the
    target is met whenever the groups the analysis allows to be pruned can carry it at all.
    """
    ratios = {name: 0.0 for name in weights}
    free = {name: w for name, w in weights.items() if w > 0}
    remaining = sparsity * len(weights)
    while free and remaining > _TOLERANCE:
        scale = remaining / sum(free.values())
        over = [name for name, w in free.items() if w * scale > cap]
        if not over:
            ratios.update({name: w * scale for name, w in free.items()})
            remaining = 0.0
            break
        for name in over:
            ratios[name] = cap
            remaining -= cap
            del free[name]
    if remaining > _TOLERANCE * len(weights):
        allowed = sum(1 for w in weights.values() if w > 0)
        raise ShrinkflowError(
            f"{key}: only {allowed} of {len(weights)} layer groups may be pruned, and at "
            f"prune.structured.max_layer_ratio {cap} they cannot reach a mean of {sparsity}"
        )
    return ratios


def _scaled_profile(
    profile: list[float], sparsity: float, groups: list[LayerGroup], key: str
) -> dict[str, float]:
    if len(profile) > len(groups):
        raise ShrinkflowError(
            f"{key}: {len(profile)} ratios for {len(groups)} prunable layer groups "
            f"(give at most {len(groups)})"
        )
    mean = sum(profile) / len(profile)
    if mean == 0 and sparsity > 0:
        raise ShrinkflowError(f"{key}: every ratio is 0, so no filter can be removed")
    scale = sparsity / mean if sparsity > 0 else 0.0
    chunks = np.array_split(np.arange(len(groups)), len(profile))
    return {
        groups[i].name: ratio * scale
        for ratio, chunk in zip(profile, chunks, strict=True)
        for i in chunk
    }


def removable(channels: int, ratio: float) -> int:
    """The filters a layer of ``channels`` may lose at ``ratio``: rounded down, never all."""
    return min(math.floor(channels * ratio + _TOLERANCE), channels - 1)


def robust_ratios(results: Sequence[SensitivityRecord], max_drop: float) -> dict[str, float]:
    """Per group, the largest swept ratio up to which every swept ratio cost at most
    ``max_drop`` of val top-1 (0.0 if even the smallest did not): ``ratios.json``."""
    chosen: dict[str, float] = {}
    failed: set[str] = set()
    for r in sorted(results, key=lambda r: r.ratio):
        name = r.group
        chosen.setdefault(name, 0.0)
        # The tolerance keeps a drop of exactly max_drop (say 100 of 5000 images at 0.02) from
        # failing by float round-off; NaN never passes.
        if name in failed or not r.drop <= max_drop + 1e-9:
            failed.add(name)
        else:
            chosen[name] = r.ratio
    return chosen
