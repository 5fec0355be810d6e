"""int8 models through torchao's PT2E flow, saved as ``torch.export`` programs (``model.pt2``).

PT2E is PyTorch 2's quantization flow (``torch.ao.quantization`` is deprecated in this torch):
the float model is captured with ``torch.export``, torchao's ``X86InductorQuantizer`` marks
the conv / linear / add / ReLU patterns the x86 backend runs in int8, observers (or fake
quantizers for QAT) collect ranges, and ``convert_pt2e`` folds every weight into an int8
constant with per-channel scales. That graph is saved with ``torch.export.save``: a zip archive
of the graph (JSON), raw tensor bytes and tensor-only sample inputs (``pt2e_archive``, which
also loads it safely).

Running it: the saved graph holds quantize / dequantize nodes around float operators (the
reference form). ``lower`` hands it to ``lower_pt2e_quantized_to_x86``, torchao's lowering to
oneDNN's int8 convolution and matmul kernels (``onednn.qconv_pointwise`` and friends), which
needs no C++ compiler and takes seconds; the lowered module is fixed to one batch size, so the
evaluation lowers once per batch size it times.
"""

from __future__ import annotations

import logging

import torch

# torchao registers an Enum with torch's pytree at import, and torch logs a deprecation warning
# for it on every run that loads this module: stderr stays for errors (and progress lines).
logging.getLogger("torch.utils._pytree").addFilter(
    lambda record: "register_constant() on Enum" not in record.getMessage()
)

# Importing the quantizer module also registers torchao's x86 int8 lowering patterns, without
# which the lowered graph silently stays in float (measured: 3.4x slower at batch 64).
import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86q  # noqa: E402
from torch import nn  # noqa: E402
from torchao.quantization.pt2e import (  # noqa: E402
    allow_exported_model_train_eval,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import (  # noqa: E402
    convert_pt2e,
    prepare_pt2e,
    prepare_qat_pt2e,
)

from shrinkflow.errors import ShrinkflowError  # noqa: E402

# Export traces with batch 2: batch 1 would make torch.export specialize the batch dimension
# (sizes 0 and 1 are always specialized), and the saved program must take any batch size.
EXPORT_BATCH = 2
BATCH_DIM = torch.export.Dim("batch", min=1, max=65536)

FAMILIES = ("static", "dynamic", "qat")


def example_input(spec: dict, batch: int = EXPORT_BATCH) -> torch.Tensor:
    return torch.zeros(batch, spec["in_channels"], spec["image_size"], spec["image_size"])


def capture(model: nn.Module, spec: dict, method: str = "int8") -> torch.fx.GraphModule:
    """The model as a graph, in its current train/eval mode, with a dynamic batch size;
    ``method`` (the quantization method it is for) names it in the error if export fails."""
    try:
        program = torch.export.export(
            model, (example_input(spec),), dynamic_shapes=({0: BATCH_DIM},)
        )
    except Exception as e:  # export reports unsupported code with many exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkflowError(
            f"quantize {method}: torch.export cannot capture model {spec['arch']} ({reason}); "
            "it cannot trace Python that branches on a tensor's values (an if on x.sum())"
        ) from None
    return program.module()


def quantizer(family: str) -> x86q.X86InductorQuantizer:
    """The x86 quantizer of a family: int8 weights per channel, int8 activations per tensor.

    static and qat quantize every supported pattern (convolutions, linear layers, residual adds,
    pooling); dynamic only the linear layers, whose activations it quantizes per batch at run
    time (the x86 backend has no dynamic convolutions).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown PT2E family {family!r}")
    q = x86q.X86InductorQuantizer()
    if family == "dynamic":
        config = x86q.get_default_x86_inductor_quantization_config(is_dynamic=True)
        return q.set_module_type_qconfig(nn.Linear, config)
    return q.set_global(x86q.get_default_x86_inductor_quantization_config(is_qat=family == "qat"))


def prepare(model: nn.Module, spec: dict, family: str) -> torch.fx.GraphModule:
    """Capture ``model`` and insert observers (static, dynamic) or fake quantizers (qat).

    A QAT graph trains: it is captured in train mode (batch norm updates its statistics) and
    answers ``.train()`` / ``.eval()`` like a module.
    """
    model.train(family == "qat")
    graph = capture(model, spec, f"{family}_int8")
    if family == "qat":
        return allow_exported_model_train_eval(prepare_qat_pt2e(graph, quantizer(family)))
    return prepare_pt2e(graph, quantizer(family))


@torch.no_grad()
def calibrate(prepared: torch.fx.GraphModule, batches: list[torch.Tensor]) -> None:
    """Let the observers see ``batches`` (a dynamic model needs none, but takes them)."""
    for x in batches:
        prepared(x)


def convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 graph: weights folded into int8 constants, the float originals dropped."""
    if any(m.training for m in prepared.modules()):
        move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    _drop_unused_tensors(converted)
    return converted


def _drop_unused_tensors(graph_module: torch.fx.GraphModule) -> None:
    """Delete parameters and buffers no node reads any more.

    ``convert_pt2e`` adds each int8 weight as a new constant but leaves the float weight it
    came from registered; ``torch.export`` would save both, and the file would be larger
    than the float model's.
    """
    graph_module.graph.eliminate_dead_code()
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    named = list(graph_module.named_parameters()) + list(graph_module.named_buffers())
    for name, _ in named:
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = graph_module.get_submodule(owner_name) if owner_name else graph_module
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
    graph_module.recompile()


def lower(program: torch.export.ExportedProgram, spec: dict, batch: int) -> torch.fx.GraphModule:
    """The program on oneDNN's int8 kernels, for inputs of exactly ``batch`` images."""
    with torch.no_grad():
        return lower_pt2e_quantized_to_x86(program.module(), (example_input(spec, batch),))


def weight_tensors(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor the program holds except quantization parameters (scales, zero points).

    Those are the model's parameters: the int8 weights, the float biases, and anything left
    in float (a dynamic model's convolutions and batch norms).
    """
    signature = program.graph_signature
    state_of_input = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    qparams = set()
    for node in program.graph.nodes:
        target = getattr(node.target, "namespace", None)
        if node.op == "call_function" and target == "quantized_decomposed":
            for arg in node.args[1:3]:
                if isinstance(arg, torch.fx.Node) and arg.name in state_of_input:
                    qparams.add(state_of_input[arg.name])
    tensors = {**program.state_dict, **program.constants}
    return {k: v for k, v in tensors.items() if k not in qparams and isinstance(v, torch.Tensor)}


# The ops of a captured model that hold its conv and linear weights (argument 1).
WEIGHT_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def layer_weights(program: torch.export.ExportedProgram) -> list[tuple[str, torch.Tensor]]:
    """The weight of every conv and linear op of ``program``, as stored (int8 where quantized),
    in graph (forward) order, each named after the module the op was captured from
    (``layer1.0.conv1``, ``fc``): torch.export records that module path on every node.

    A quantized weight reaches its op through a ``dequantize_per_channel`` node, whose first
    argument is the stored tensor; ``convert_pt2e`` names that tensor ``_frozen_param<i>``,
    hence the module path. A node without one falls back to its tensor's name.
    """
    signature = program.graph_signature
    state_of_input = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    tensors = {**program.state_dict, **program.constants}
    layers = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_OPS:
            continue
        weight = node.args[1]
        if weight.op == "call_function":  # dequantize_per_channel(stored int8 weight, ...)
            weight = weight.args[0]
        key = state_of_input[weight.name]
        modules = list((node.meta.get("nn_module_stack") or {}).values())
        name = modules[-1][0] if modules else key.removesuffix(".weight")
        layers.append((name, tensors[key]))
    return layers
