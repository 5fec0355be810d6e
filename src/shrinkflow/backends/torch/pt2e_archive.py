"""The int8 model file (``model.pt2``): a ``torch.export`` archive of the converted PT2E graph
with the model's spec inside, written by ``save`` and read back by ``load``.

``torch.export.load`` itself would run code from a crafted archive, so ``load`` checks the
archive before torch sees it and refuses every unpickling fallback while torch reads it (see
``load``). The quantization flow that produces the graph is ``pt2e``.
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

from shrinkflow.backends.torch.artifact import (
    INT8_FILE,
    SPEC_KEYS,
    first_line,
    weights_only_refusal,
)
from shrinkflow.backends.torch.pt2e import BATCH_DIM, example_input
from shrinkflow.errors import ShrinkflowError
from shrinkflow.nodes import check_artifact

PT2_FILE = INT8_FILE
FORMAT = "shrinkflow.torch.pt2e/1"
# The spec travels inside the archive, as one of torch.export's "extra files".
SPEC_ENTRY = "shrinkflow.json"


def save(converted: torch.fx.GraphModule, spec: dict[str, Any], folder: Path) -> Path:
    """Write the int8 graph and ``spec`` to ``folder/model.pt2``; return the path."""
    shapes = ({0: BATCH_DIM},)
    program = torch.export.export(converted, (example_input(spec),), dynamic_shapes=shapes)
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
