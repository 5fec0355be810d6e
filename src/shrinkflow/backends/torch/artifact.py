"""The deployable model file of a node: a state dict plus the spec needed to rebuild the model.

The file holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``: opening a model file never runs code from it.

Filter-pruned models (Torch-Pruning removes whole channels) keep the registry's architecture
with fewer channels per layer. The file needs nothing extra for them: the saved tensors carry
the pruned shapes, so ``load_model`` builds the registry model, shrinks each convolution,
linear and batch-norm layer to the shapes of its saved tensors, and then loads the weights.
The file stays exactly the weights a user deploys (its size is the size reported), with no
pickled module and no second description of the architecture that could disagree with them.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrinkflow.backends.torch import fixed_point
from shrinkflow.backends.torch.models import create_model
from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import check_artifact

MODEL_FILE = "model.pt"
INT8_FILE = "model.pt2"  # an int8 torch.export program (see pt2e); its spec is inside
FORMAT = "shrinkflow.torch/1"
SPEC_KEYS = ("arch", "num_classes", "in_channels", "image_size", "mean", "std", "classes")
# The layers whose width structured pruning changes (the registry's CNNs are all 2-D); any
# other layer must keep its shapes.
RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
# What torch's weights-only unpickler says it refused ("Unsupported global: GLOBAL exec was
# not an allowed global by default", "Unsupported operand 149"), after its long preamble.
_WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*(Unsupported [^.\n]*)")


def save_model(model: nn.Module, spec: dict[str, Any], folder: Path) -> Path:
    """Write ``model``'s weights and ``spec`` to ``folder/model.pt`` and return the path.

    Args:
        spec: ``arch`` (registry name), ``num_classes``, ``in_channels``, ``image_size``,
            ``mean``/``std`` (per channel, 0..1 scale) and ``classes``; plain Python types only.
            A ``custom_models`` model's spec also holds ``factory``, the ref that rebuilds it.
            A filter-pruned model is saved with the spec of the model it was pruned from.
    """
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}")
    # CPU copies make the file loadable on any machine, whichever device trained it.
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(folder) / MODEL_FILE
    torch.save({"format": FORMAT, "spec": dict(spec), "state_dict": state}, path)
    return path


def save_fixed_point(model: nn.Module, spec: dict[str, Any], bits: int, folder: Path) -> Path:
    """Write ``model`` with ``bits``-bit fixed-point weights (see ``fixed_point``) to
    ``folder/model.pt``: the same file name and spec as a float model, another format."""
    path = Path(folder) / MODEL_FILE
    payload = {"format": fixed_point.PACKED_FORMAT, "spec": dict(spec)}
    torch.save({**payload, **fixed_point.pack_state(model, bits)}, path)
    return path


def load_model(folder: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved in ``folder`` (in eval mode, on ``device``) and return its spec.

    A fixed-point file loads as the float model its integer weights describe.
    """
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{path}: model file not found")
    payload = load_tensor_file(path, device, "PyTorch model file")
    formats = (FORMAT, fixed_point.PACKED_FORMAT)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ShrinkflowError(
            f"{path}: not a shrinkflow model file (expected format {' or '.join(formats)})"
        )
    spec = payload.get("spec")
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        raise ShrinkflowError(f"{path}: model spec must hold {', '.join(SPEC_KEYS)}")
    fixed = payload["format"] == fixed_point.PACKED_FORMAT
    bits = payload.get("bits") if fixed else None
    check_artifact(
        path.parent,
        backend="torch",
        arch=spec["arch"],
        kind="fixed" if fixed else "float",
        bits=bits if isinstance(bits, int) else None,
    )
    try:
        model = create_model(
            spec["arch"],
            spec["num_classes"],
            in_channels=spec["in_channels"],
            image_size=spec["image_size"],
            factory=spec.get("factory"),
        )
    except (TypeError, ValueError) as e:
        raise ShrinkflowError(f"{path}: model spec does not describe a model ({e})") from None
    try:
        state = payload["state_dict"]
        if payload["format"] == fixed_point.PACKED_FORMAT:
            state = fixed_point.unpack_state(payload)
        resized = _fit_shapes(model, state)
        model.load_state_dict(state)
        if resized:
            _check_forward(model, spec)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        reason = str(e).splitlines()[0]
        raise ShrinkflowError(f"{path}: weights do not fit {spec['arch']} ({reason})") from None
    return model.to(device).eval(), spec


def load_tensor_file(path: Path, device: torch.device | str, what: str) -> Any:
    """``torch.load`` of ``path`` by the weights-only unpickler, which builds tensors and plain
    containers and refuses anything else before running it; a one-line ShrinkflowError naming
    ``path`` (as ``what``) for a file it refuses or cannot read."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = weights_only_refusal(e)
        if refused is None:
            raise ShrinkflowError(f"{path}: not a readable {what} ({first_line(e)})") from None
        raise ShrinkflowError(
            f"{path}: refusing to load: it pickles more than tensors ({refused}); "
            "shrinkflow never unpickles code from a model file"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError) as e:
        raise ShrinkflowError(f"{path}: not a readable {what} ({first_line(e)})") from None


def weights_only_refusal(e: BaseException) -> str | None:
    """What torch's weights-only unpickler refused ("Unsupported global: GLOBAL exec was not an
    allowed global by default"), from the long message it raises; None for other errors."""
    found = _WEIGHTS_ONLY_REASON.search(str(e))
    return found.group(1) if found else None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), without the
    terminal colour codes torch puts in some."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fit_shapes(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Shrink (or widen) the layers of ``model`` to the shapes of their tensors in ``state``.

    Returns whether any layer changed: False for a model saved unpruned. The weights themselves
    are left to ``load_state_dict``, which also reports missing and unexpected keys.
    """
    resized = False
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = dict(module.named_parameters(recurse=False))
        own.update(module.named_buffers(recurse=False))
        changed = {
            key: state[prefix + key].shape
            for key, tensor in own.items()
            if prefix + key in state and state[prefix + key].shape != tensor.shape
        }
        if not changed:
            continue
        if not isinstance(module, RESIZABLE):
            raise ValueError(f"{prefix}{next(iter(changed))} has another shape than the model's")
        for key, shape in changed.items():
            old = getattr(module, key)
            new = torch.empty(shape, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            setattr(module, key, new)
        _restate_width(module)
        resized = True
    return resized


def _restate_width(module: nn.Module) -> None:
    """Set a resized layer's channel attributes from its tensors, as Torch-Pruning does."""
    if isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    else:
        reference = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = reference.shape[0]


@torch.no_grad()
def _check_forward(model: nn.Module, spec: dict) -> None:
    """One forward pass, so that shapes which do not chain fail at load, not later."""
    model.eval()
    logits = model(torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"]))
    if tuple(logits.shape) != (1, spec["num_classes"]):
        raise ValueError(f"the model outputs shape {tuple(logits.shape)}")
