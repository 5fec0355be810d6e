"""`shrinkflow prune` for the structured methods: whole filters leave, so the model shrinks.

Torch-Pruning traces the model into a dependency graph and removes channels one *layer group*
at a time: the convolutions whose outputs must keep the same channels (a residual stage's
convolutions and its shortcut projection, whose outputs are summed) together with every layer
reading those channels (batch norms, the next convolutions' inputs, the classifier's input).
A group is named after its member that runs first; its ratio is the share of its filters
removed. The output layer and ``prune.exclude`` never lose filters, and a group holding an
excluded layer is left whole, so residual sums always stay consistent.

Filter choice: ``structured_l1`` ranks a group's channels by the L1 norm of the weights they
touch in the group's conv and linear layers (their filters and the next layers' input slices);
``structured_random`` ranks them by seeded random scores (the control); ``structured_sensitivity``
is ``structured_l1`` with per-group ratios from the sensitivity stage (see ``plan_ratios``).

``resume_dir`` is not used: pruning itself takes seconds, so a killed job starts over; only
the fine-tuning between ``prune.structured.rounds`` would be repeated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import first_line, load_model, save_model
from shrinkflow.backends.torch.device import resolve_device
from shrinkflow.backends.torch.evaluate import ACCURACY_BATCH, PRUNABLE, count_macs
from shrinkflow.backends.torch.prune_unstructured import prunable_modules
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.backends.torch.train import fit_in_memory
from shrinkflow.backends.torch.trainer import evaluate_split
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError
from shrinkflow.progress import say
from shrinkflow.structured_ratios import (
    LayerGroup,
    plan_ratios,
    removable,
)

METHODS = ("structured_l1", "structured_random", "structured_sensitivity")


def example_input(spec: dict, device: torch.device | str) -> torch.Tensor:
    """One blank image of the model's input shape, for tracing and counting MACs."""
    side = spec["image_size"]
    return torch.zeros(1, spec["in_channels"], side, side, device=device)


def ignored_layers(model: nn.Module, exclude: list[str]) -> list[nn.Module]:
    """The conv and linear layers that must keep all their filters: the output layer (under
    the pattern ``output``) and the other ``prune.exclude`` matches."""
    kept = {id(m) for _, m in prunable_modules(model, exclude)}
    return [m for m in model.modules() if isinstance(m, PRUNABLE) and id(m) not in kept]


def layer_groups(
    model: nn.Module, example: torch.Tensor, ignored: list[nn.Module]
) -> list[LayerGroup]:
    """The prunable layer groups of ``model`` in forward order (see the module docstring)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    names = {m: n for n, m in model.named_modules()}
    order = _run_order(model, example)
    found = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE)):
        members = sorted(
            {
                dep.target.module
                for dep, _ in group
                if isinstance(dep.target.module, PRUNABLE)
                and graph.is_out_channel_pruning_fn(dep.handler)
            },
            key=order.__getitem__,
        )
        found.append(
            LayerGroup(
                name=names[members[0]],
                members=tuple(names[m] for m in members),
                channels=graph.get_out_channels(members[0]),
            )
        )
    return sorted(found, key=lambda g: order[model.get_submodule(g.name)])


def _run_order(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Each conv/linear layer's position in the order a forward pass calls them."""
    order: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs: tuple) -> None:  # returning None keeps the inputs
        order.setdefault(module, len(order))

    hooks = [
        m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, PRUNABLE)
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return order


class _SeededRandomImportance(tp.importance.Importance):
    """Uniform random channel scores from a private generator: the same choice for the same
    seed, without drawing from (and so shifting) torch's global RNG."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)


def importance(method: str, seed: int) -> tp.importance.Importance:
    """The filter-ranking criterion of ``method``."""
    if method == "structured_random":
        return _SeededRandomImportance(seed)
    # p=1: the L1 filter norm of Li et al. (2017). Batch-norm scales are left out of the score
    # so that it is the weights' norm alone; each group's scores are divided by their mean
    # (the default normalizer), which lets one global ranking compare layers of any fan-in.
    return tp.importance.GroupMagnitudeImportance(p=1, target_types=list(PRUNABLE))


def build_pruner(
    model: nn.Module,
    example: torch.Tensor,
    criterion: tp.importance.Importance,
    ratios: dict[str, float] | None,
    sparsity: float,
    ignored: list[nn.Module],
    rounds: int,
    max_ratio: float,
) -> tp.pruner.BasePruner:
    """A Torch-Pruning pruner that reaches ``ratios`` (or, if None, the global ``sparsity``)
    in ``rounds`` equal steps; run each step with ``prune_step``."""
    return tp.pruner.BasePruner(
        model,
        example,
        criterion,
        global_pruning=ratios is None,
        pruning_ratio=sparsity,
        pruning_ratio_dict=(
            None if ratios is None else {model.get_submodule(n): r for n, r in ratios.items()}
        ),
        max_pruning_ratio=max_ratio,
        iterative_steps=rounds,
        ignored_layers=ignored,
    )


def prune_step(pruner: tp.pruner.BasePruner, max_ratio: float) -> int:
    """One step of ``pruner``, but no group loses more than ``max_ratio`` of its original
    filters, nor its last one. Returns how many groups were held back by that limit.

    Torch-Pruning bounds a group only between steps, so a global ranking could otherwise take
    a whole layer at once; the filters it is denied stay in the model (measured sparsity then
    falls short of the target, and says so).
    """
    held = 0
    for group in pruner.step(interactive=True):
        root, handler, idxs = group[0].dep.target.module, group[0].dep.handler, group[0].idxs
        initial, current = pruner.layer_init_out_ch[root], pruner.DG.get_out_channels(root)
        allowed = removable(initial, max_ratio) - (initial - current)
        if len(idxs) > allowed:
            held += 1
            if allowed <= 0:
                continue
            full = pruner.DG.get_pruning_group(root, handler, list(range(current)))
            scores = pruner.estimate_importance(full).tolist()
            idxs = sorted(idxs, key=scores.__getitem__)[:allowed]
            group = pruner.DG.get_pruning_group(root, handler, idxs)
        group.prune()
    return held


@contextmanager
def torch_pruning_errors(job: str, arch: str, step: str) -> Iterator[None]:
    """Turn a failure inside Torch-Pruning, or of the model it pruned, into one line naming
    the job (``prune structured_l1``, ``sensitivity``), the model, the step and the reason.
    The registry's models are built for Torch-Pruning; a custom model may not be."""
    try:
        yield
    except ShrinkflowError:
        raise
    except Exception as e:  # Torch-Pruning and the model's own code raise many kinds
        raise ShrinkflowError(
            f"{job}: Torch-Pruning cannot prune model {arch}: {step} failed "
            f"({first_line(e)}); a reshape or view to fixed sizes, or a layer's weight used "
            "outside its module, keeps it from following the channels"
        ) from None


def weight_count(model: nn.Module) -> int:
    """Weights of the conv and linear layers: the denominator of measured sparsity."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, PRUNABLE))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def val_top1(model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> float:
    """Top-1 on the (device-resident) val split in eval mode; NaN when it is empty."""
    return evaluate_split(model, x_val, y_val, ACCURACY_BATCH, amp=False)[1]


def prune_structured(
    cfg: dict,
    method: str,
    sparsity: float,
    model_dir: Path,
    data: PreparedData,
    context: JobContext,
    sensitivity_dir: Path | None = None,
) -> dict[str, float | int]:
    """Remove the ``sparsity`` share of filters from the model in ``model_dir``; save it smaller.

    Pruning runs in ``prune.structured.rounds`` equal steps with ``round_epochs`` of
    fine-tuning (at ``finetune.lr``) between them, none after the last: the DAG's finetune
    stage follows. ``context.on_epoch(round, metrics)`` receives round, params, macs and
    val_top1 measured right after each round's pruning. Nothing is resumed.

    Returns ``measured_sparsity`` (share of conv and linear weights removed), ``val_top1``,
    ``params``, ``params_before``, ``macs``, ``macs_before`` and ``layer_groups``.
    """
    if method not in METHODS:
        raise ShrinkflowError(f"prune.methods: {method!r} is not one of {', '.join(METHODS)}")
    settings = cfg["prune"]["structured"]
    rounds, round_epochs = int(settings["rounds"]), int(settings["round_epochs"])
    if rounds < 1:
        raise ShrinkflowError(f"prune.structured.rounds: {rounds} is not >= 1")
    max_ratio = float(settings["max_layer_ratio"])
    dev = resolve_device("auto")
    model, spec = load_model(model_dir, dev)
    example = example_input(spec, dev)
    ignored = ignored_layers(model, cfg["prune"]["exclude"])
    with torch_pruning_errors(f"prune {method}", spec["arch"], "tracing it"):
        groups = layer_groups(model, example, ignored)
    ratios = plan_ratios(cfg, method, sparsity, groups, sensitivity_dir)
    x_val, y_val = to_device_tensors(data, "val", dev)
    weights_before, params_before = weight_count(model), param_count(model)
    macs_before = count_macs(model, tuple(example.shape))

    with torch_pruning_errors(f"prune {method}", spec["arch"], "tracing it"):
        pruner = build_pruner(
            model,
            example,
            importance(method, cfg["seed"]),
            ratios,
            sparsity,
            ignored,
            rounds,
            max_ratio,
        )
    for round_ in range(1, rounds + 1):
        with torch_pruning_errors(f"prune {method}", spec["arch"], "running the pruned model"):
            held = prune_step(pruner, max_ratio)
            with torch.no_grad():
                model.eval()(example)  # a shape Torch-Pruning could not follow fails here
        if held:
            say(f"round {round_}: {held} layer group(s) held at max_layer_ratio {max_ratio}")
        metrics = {
            "round": round_,
            "params": param_count(model),
            "macs": count_macs(model, tuple(example.shape)),
            "val_top1": val_top1(model, x_val, y_val),
        }
        say(
            f"round {round_}/{rounds}: {metrics['params']} params "
            f"({metrics['params'] / params_before:.1%}), {metrics['macs']} MACs "
            f"({metrics['macs'] / macs_before:.1%}), val top-1 {metrics['val_top1']:.4f}"
        )
        context.on_epoch(round_, metrics)
        if round_ < rounds and round_epochs > 0:
            fit_in_memory(
                model,
                cfg,
                data,
                epochs=round_epochs,
                lr=float(cfg["finetune"]["lr"]),
                device=str(dev),
                lr_key="finetune.lr",
            )

    model.eval()
    save_model(model, spec, Path(context.out_dir))
    return {
        "measured_sparsity": 1.0 - weight_count(model) / weights_before,
        "val_top1": metrics["val_top1"],
        "params": metrics["params"],
        "params_before": params_before,
        "macs": metrics["macs"],
        "macs_before": macs_before,
        "layer_groups": len(groups),
    }
