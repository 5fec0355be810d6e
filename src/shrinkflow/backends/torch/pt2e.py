"""int8 models through torchao's PT2E flow, saved as ``torch.export`` programs (``model.pt2``).

PT2E is PyTorch 2's quantization flow (``torch.ao.quantization`` is deprecated in this torch):
the float model is captured with ``torch.export``, torchao's ``X86InductorQuantizer`` marks
the conv / linear / add / ReLU patterns the x86 backend runs in int8, observers (or fake
quantizers for QAT) collect ranges, and ``convert_pt2e`` folds every weight into an int8
constant with per-channel scales. That graph is saved with ``torch.export.save``: a zip archive
of the graph (JSON), raw tensor bytes and tensor-only sample inputs. ``torch.export.load``
itself would run code from a crafted archive, so ``load`` checks the archive before torch sees
it and refuses every unpickling fallback while torch reads it (see ``load``).

Running it: the saved graph holds quantize / dequantize nodes around float operators (the
reference form). ``lower`` hands it to ``lower_pt2e_quantized_to_x86``, torchao's lowering to
oneDNN's int8 convolution and matmul kernels (``onednn.qconv_pointwise`` and friends), which
needs no C++ compiler and takes seconds; the lowered module is fixed to one batch size, so the
evaluation lowers once per batch size it times.
"""

from __future__ import annotations

import io
import json
import logging
import operator
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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

from shrinkflow.backends.torch.artifact import (  # noqa: E402
    INT8_FILE,
    SPEC_KEYS,
    first_line,
    weights_only_refusal,
)
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.nodes import check_artifact  # noqa: E402

PT2_FILE = INT8_FILE
FORMAT = "shrinkflow.torch.pt2e/1"
# The spec travels inside the archive, as one of torch.export's "extra files".
SPEC_ENTRY = "shrinkflow.json"
# Export traces with batch 2: batch 1 would make torch.export specialize the batch dimension
# (sizes 0 and 1 are always specialized), and the saved program must take any batch size.
EXPORT_BATCH = 2
_BATCH = torch.export.Dim("batch", min=1, max=65536)

FAMILIES = ("static", "dynamic", "qat")


def example_input(spec: dict, batch: int = EXPORT_BATCH) -> torch.Tensor:
    return torch.zeros(batch, spec["in_channels"], spec["image_size"], spec["image_size"])


def capture(model: nn.Module, spec: dict) -> torch.fx.GraphModule:
    """The model as a graph, in its current train/eval mode, with a dynamic batch size."""
    try:
        program = torch.export.export(model, (example_input(spec),), dynamic_shapes=({0: _BATCH},))
    except Exception as e:  # export reports unsupported code with many exception types
        raise ShrinkflowError(
            f"model {spec['arch']}: torch.export cannot capture it for quantization "
            f"({str(e).splitlines()[0]})"
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
    graph = capture(model, spec)
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


def save(converted: torch.fx.GraphModule, spec: dict[str, Any], folder: Path) -> Path:
    """Write the int8 graph and ``spec`` to ``folder/model.pt2``; return the path."""
    program = torch.export.export(converted, (example_input(spec),), dynamic_shapes=({0: _BATCH},))
    path = Path(folder) / PT2_FILE
    payload = json.dumps({"format": FORMAT, "spec": spec})
    torch.export.save(program, path, extra_files={SPEC_ENTRY: payload})
    return path


def load(folder: Path) -> tuple[torch.export.ExportedProgram, dict]:
    """The saved program and its spec; a one-line ShrinkflowError for anything else.

    ``torch.export.load`` is not safe on a file from elsewhere: it unpickles the archive's
    sample inputs (retrying with ``weights_only=False`` when the safe load fails), pickled
    weights and constants, loads AOTInductor shared libraries, evaluates the shape expressions
    with ``sympy.sympify`` (``eval``), resolves call targets by attribute path from ``torch``
    and turns the stored guards into Python source that ``program.module()`` executes. So the
    archive is read into memory once and checked first (``_check_archive``: only the members
    ``save`` writes, no pickled payload, only tensor-only pickles, only ATen and quantization
    operators, only plain sympy shape expressions, only size guards); then torch loads those
    same bytes with every unpickling fallback refused and its log silenced, and the program
    is checked again (``_check_program``) before anything runs it.
    """
    path = Path(folder) / PT2_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{path}: quantized model file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShrinkflowError(f"{path}: unreadable ({e.strerror or e})") from None
    spec = _check_archive(path, data)
    try:
        with _unpickling_refused(path), _torch_export_log_off():
            program = torch.export.load(io.BytesIO(data))
    except ShrinkflowError:
        raise
    except Exception as e:  # torch reports a damaged archive with many exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkflowError(f"{path}: not a readable torch.export program ({reason})") from None
    _check_program(path, program)
    check_artifact(Path(folder), backend="torch", arch=spec["arch"], kind="int8")
    return program, spec


# What an archive written by ``save`` holds, below its root folder. Anything else is refused:
# AOTInductor's shared libraries (data/aotinductor/), the legacy pickled weights and constants
# (data/weights/model.pt), pickled custom and opaque objects, further programs.
_MEMBERS = re.compile(
    r"\.data/(?:version|serialization_id)|archive_format|archive_version|byteorder"
    r"|models/model\.json|extra/shrinkflow\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/constants/model_constants_config\.json"
    r"|data/weights/weight_\d+|data/constants/tensor_\d+"
)
_REQUIRED = (
    "archive_format",
    "models/model.json",
    "data/sample_inputs/model.pt",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    SPEC_ENTRY_PATH := f"extra/{SPEC_ENTRY}",
)
_PAYLOAD_CONFIGS = {
    "data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
    "data/constants/model_constants_config.json": re.compile(r"tensor_\d+"),
}
# Operators a quantized CNN's graph may call: ATen's, the quantize/dequantize ops and the
# tuple indexing of multi-output ops. One leading underscore at most: no dunder attributes.
_OP_NAMESPACES = ("aten", "quantized_decomposed", "prims")
_OP_TARGET = re.compile(
    rf"torch\.ops\.(?:{'|'.join(_OP_NAMESPACES)})\._?[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*"
    r"|_operator\.getitem"
)
# Shape expressions are handed to sympy.sympify, which evals them: only sympy's constructors,
# torch's sympy functions, symbol names, integers and arithmetic may appear.
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|(\d+)|('[A-Za-z]\d*')|([-+*/(),=<>]))")
_EXPR_NAMES = frozenset(
    """Symbol Integer Rational Add Mul Pow Max Min Abs Eq Ne Lt Le Gt Ge And Or Not true false
    True False positive integer nonnegative negative real finite FloorDiv ModularIndexing Where
    PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow
    FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
    RoundDecimal ToFloat Identity""".split()  # noqa: SIM905
)
# Guards become Python source: only comparisons of an input's size or stride with a number.
_GUARD = re.compile(
    r"L\['[A-Za-z_][A-Za-z0-9_]*'\](?:\.(?:size|stride)\(\)\[\d+\])?"
    r"\s*(?:==|!=|<=|>=|<|>)\s*-?\d+"
)


def _check_archive(path: Path, data: bytes) -> dict:
    """Refuse an archive holding anything ``save`` does not write or a loader could run; return
    the spec it carries."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ShrinkflowError(f"{path}: not a readable torch.export program ({e})") from None
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise ShrinkflowError(
            f"{path}: not a readable torch.export program (its members are not in one folder)"
        )
    root = f"{roots.pop()}/"
    members = {name[len(root) :] for name in names}
    strange = sorted(m for m in members if not _MEMBERS.fullmatch(m))
    if strange:
        raise ShrinkflowError(
            f"{path}: refusing member {root}{strange[0]} (a shrinkflow int8 program holds only "
            "its graph as JSON, raw tensors, tensor-only sample inputs and its spec)"
        )
    missing = [m for m in _REQUIRED if m not in members]
    if missing:
        raise ShrinkflowError(f"{path}: not a shrinkflow int8 program (no {root}{missing[0]})")

    def read_json(member: str) -> Any:
        try:
            return json.loads(archive.read(root + member))
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise ShrinkflowError(f"{path}: {root}{member} is not readable JSON ({e})") from None

    for member, allowed in _PAYLOAD_CONFIGS.items():
        config = read_json(member)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise ShrinkflowError(f"{path}: {root}{member} has no config object")
        for name, entry in entries.items():
            if (
                not isinstance(entry, dict)
                or entry.get("use_pickle") is not False
                or not allowed.fullmatch(str(entry.get("path_name")))
            ):
                raise ShrinkflowError(
                    f"{path}: {root}{member}: entry {name!r} is not a raw tensor (pickled "
                    "payloads are refused: unpickling can run code)"
                )
    _check_graph(path, read_json("models/model.json"))
    _check_tensor_pickle(path, root + "data/sample_inputs/model.pt", archive)
    payload = read_json(SPEC_ENTRY_PATH)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ShrinkflowError(f"{path}: not a shrinkflow quantized model (expected {FORMAT})")
    spec = payload.get("spec")
    if not isinstance(spec, dict) or any(k not in spec for k in SPEC_KEYS):
        raise ShrinkflowError(f"{path}: model spec must hold {', '.join(SPEC_KEYS)}")
    return spec


def _check_graph(path: Path, program: Any) -> None:
    """The serialized program's call targets, shape expressions and guards (see ``load``)."""
    if not isinstance(program, dict):
        raise ShrinkflowError(f"{path}: the program is not a JSON object")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(
        isinstance(g, str) and _GUARD.fullmatch(g) for g in guards
    ):
        raise ShrinkflowError(f"{path}: refusing its guards (only input size checks may appear)")
    stack = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            target = item.get("target")
            if isinstance(target, str) and not _OP_TARGET.fullmatch(target):
                raise ShrinkflowError(
                    f"{path}: refusing call target {target[:80]!r} (only "
                    f"{', '.join(_OP_NAMESPACES)} operators may appear)"
                )
            expr = item.get("expr_str")
            if expr is not None and not _plain_expression(expr):
                raise ShrinkflowError(
                    f"{path}: refusing shape expression {str(expr)[:80]!r} (only symbols, "
                    "integers and arithmetic may appear)"
                )
            stack.extend(item.values())


def _plain_expression(expr: Any) -> bool:
    """Whether ``expr`` is made of sympy constructors, symbols, integers and operators only."""
    if not isinstance(expr, str):
        return False
    position = 0
    while position < len(expr.rstrip()):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None or (match.group(1) and match.group(1) not in _EXPR_NAMES):
            return False
        position = match.end()
    return True


def _check_tensor_pickle(path: Path, member: str, archive: zipfile.ZipFile) -> None:
    """Refuse a pickle member that torch's weights-only unpickler does not accept: it holds
    objects other than tensors and containers (torch would retry it with ``weights_only=False``,
    running whatever it holds)."""
    try:
        torch.load(io.BytesIO(archive.read(member)), weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses with several types
        reason = weights_only_refusal(e) or first_line(e)
        raise ShrinkflowError(
            f"{path}: refusing {member}: it pickles more than tensors ({reason[:120]})"
        ) from None


def _check_program(path: Path, program: torch.export.ExportedProgram) -> None:
    """The loaded graph calls only allowed operators and takes only tensors (a non-tensor
    input would be written into the guard source ``program.module()`` executes)."""
    for node in program.graph.nodes:
        if node.op == "call_function":
            target = node.target
            allowed = target is operator.getitem or (
                isinstance(target, torch._ops.OpOverload) and target.namespace in _OP_NAMESPACES
            )
            if not allowed:
                raise ShrinkflowError(f"{path}: refusing call target {target!r}")
        elif node.op == "placeholder":
            if not isinstance(node.meta.get("val"), torch.Tensor):
                raise ShrinkflowError(f"{path}: refusing input {node.name!r} (not a tensor)")
        elif node.op not in ("get_attr", "output"):
            raise ShrinkflowError(f"{path}: refusing {node.op} node {node.name!r}")


@contextmanager
def _unpickling_refused(path: Path) -> Iterator[None]:
    """While torch loads the archive, ``torch.load`` may only run its weights-only unpickler:
    the retry with ``weights_only=False`` (and any other full unpickling) is refused."""
    real = torch.load

    def tensors_only(f: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> Any:
        if weights_only is False:
            raise ShrinkflowError(
                f"{path}: refusing to unpickle Python objects from it (unpickling can run code)"
            )
        return real(f, *args, weights_only=True, **kwargs)

    torch.load = tensors_only
    try:
        yield
    finally:
        torch.load = real


@contextmanager
def _torch_export_log_off() -> Iterator[None]:
    """Silence torch.export's loggers: a damaged archive makes them print a traceback before
    the exception that this module turns into one line."""
    import torch._export.serde.serialize  # noqa: F401  (create their loggers first)
    import torch.export.pt2_archive._package  # noqa: F401

    names = {"torch.export", "torch._export"}
    names.update(
        name
        for name in logging.Logger.manager.loggerDict
        if name.startswith(("torch.export.", "torch._export."))
    )
    loggers = [logging.getLogger(name) for name in sorted(names)]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before, strict=True):
            logger.disabled = disabled


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
