"""A torch node's weights as ``sparse_format.StoredTensor``s, at the precision its file holds.

- float model (``model.pt``): the state dict; conv and linear kernels sparse float32;
- fixed-point model (``model.pt``, ``fixed_point.PACKED_FORMAT``): the packed conv/linear
  weights as ``bits``-bit codes with their per-output-channel (dim 0) scales, the rest float;
- int8 program (``model.pt2``): every tensor ``pt2e.weight_tensors`` lists, the int8 weights
  as codes with the scales and zero points their ``dequantize_per_channel`` (or
  ``_per_tensor``) node reads; keys are the program's own tensor names (``_frozen_param0``).

``load_sparse_model`` runs an exported float or fixed-point archive: its dequantized tensors
are a state dict, loaded by ``artifact.load_model`` with the same checks as a model file. An
int8 program's archive holds its constants, not a state dict: run its ``model.pt2``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shrinkflow import sparse_format
from shrinkflow.backends.torch import fixed_point
from shrinkflow.backends.torch.artifact import (
    FORMAT,
    INT8_FILE,
    MODEL_FILE,
    load_model,
    load_tensor_file,
)
from shrinkflow.errors import ShrinkflowError
from shrinkflow.sparse_format import StoredTensor

Meta = dict[str, Any]  # backend, file, format and spec: what the exporter writes in the index
# The ops that expand a stored int8 weight: quantized_decomposed.dequantize_per_channel (axis
# in argument 3) or dequantize_per_tensor; arguments 1 and 2 are its scale and zero point.
DEQUANTIZE = ("dequantize_per_channel", "dequantize_per_tensor")


def stored_weights(model_dir: Path) -> tuple[dict[str, StoredTensor], Meta]:
    """The weights of the model file in ``model_dir`` and the metadata an export records."""
    model_dir = Path(model_dir)
    if (model_dir / INT8_FILE).is_file():
        return _program_weights(model_dir)
    path = model_dir / MODEL_FILE
    if not path.is_file():
        raise ShrinkflowError(f"{model_dir}: no {MODEL_FILE} or {INT8_FILE}")
    payload = load_tensor_file(path, "cpu", "PyTorch model file")
    formats = (FORMAT, fixed_point.PACKED_FORMAT)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ShrinkflowError(f"{path}: not a shrinkflow model file ({' or '.join(formats)})")
    meta = {"backend": "torch", "file": MODEL_FILE, "format": payload["format"]}
    meta["spec"] = payload.get("spec")
    try:
        tensors = {k: _plain(v) for k, v in payload["state_dict"].items()}
        if payload["format"] == fixed_point.PACKED_FORMAT:
            tensors.update(_fixed_weights(payload))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShrinkflowError(f"{path}: weights not readable ({e})") from None
    return tensors, meta


def _plain(tensor: torch.Tensor) -> StoredTensor:
    """A tensor stored as it is: kernels (see ``sparse_format.is_weight``) sparse."""
    array = tensor.detach().cpu().numpy()
    return StoredTensor(array, sparse=sparse_format.is_weight(array))


def _fixed_weights(payload: dict) -> dict[str, StoredTensor]:
    """The packed weights of a fixed-point file as codes, scale per output channel (dim 0)."""
    bits = int(payload["bits"])
    weights = {}
    for key, entry in payload["packed"].items():
        codes = fixed_point.unpack(entry["codes"], bits, tuple(entry["shape"])).numpy()
        scale = entry["scale"].numpy()
        weights[key] = StoredTensor(codes, sparse=True, scale=scale, axis=0, bits=bits)
    return weights


def _program_weights(model_dir: Path) -> tuple[dict[str, StoredTensor], Meta]:
    """The int8 program's tensors: weights as int8 codes with their quantization parameters."""
    from shrinkflow.backends.torch import pt2e, pt2e_archive  # torchao: 2.3 s to import

    program, spec = pt2e_archive.load(model_dir)
    signature = program.graph_signature
    state_of_input = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    every = {**program.state_dict, **program.constants}
    tensors = {k: _plain(v) for k, v in pt2e.weight_tensors(program).items()}
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", "").split(".")[0]  # less the overload
        namespace = getattr(node.target, "namespace", None)
        if namespace != "quantized_decomposed" or name not in DEQUANTIZE:
            continue
        stored = node.args[0]
        if not isinstance(stored, torch.fx.Node) or stored.name not in state_of_input:
            continue  # an activation's dequantize
        key = state_of_input[stored.name]
        scale, zero_point = (_qparam(arg, every, state_of_input) for arg in node.args[1:3])
        axis = int(node.args[3]) if name == DEQUANTIZE[0] else None
        codes = every[key].detach().cpu().numpy()
        tensors[key] = StoredTensor(
            codes,
            sparse=sparse_format.is_weight(codes, quantized=True),
            scale=scale,
            zero_point=zero_point,
            axis=axis,
        )
    meta = {"backend": "torch", "file": INT8_FILE, "format": pt2e_archive.FORMAT, "spec": spec}
    return tensors, meta


def _qparam(arg: Any, every: dict[str, torch.Tensor], state_of_input: dict) -> np.ndarray:
    """A scale or zero point argument: a stored tensor (per channel) or a literal number."""
    if isinstance(arg, torch.fx.Node):
        return every[state_of_input[arg.name]].detach().cpu().numpy()
    return np.asarray(arg)


def encoding_sizes(model_dir: Path) -> dict[str, int]:
    """``nominal_bytes``, ``sparse_bytes`` and ``sparse_gzip_bytes`` of the model in
    ``model_dir`` (see ``sparse_format``), as ``evaluate`` reports them."""
    return sparse_format.figures(stored_weights(model_dir)[0])


def load_sparse_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """The model of an archive ``shrinkflow export-sparse`` wrote from a float or fixed-point
    torch node, weights dequantized to float32, and its spec (as ``artifact.load_model``)."""
    tensors, meta = sparse_format.read(path)
    if meta.get("backend") != "torch" or meta.get("file") != MODEL_FILE:
        raise ShrinkflowError(
            f"{path}: not an export of a torch {MODEL_FILE} (it holds {meta.get('file')!r} "
            f"of backend {meta.get('backend')!r}); an int8 program runs from its {INT8_FILE}"
        )
    state = {k: torch.from_numpy(np.array(t.dequantize())) for k, t in tensors.items()}
    with tempfile.TemporaryDirectory(prefix="shrinkflow-sparse-") as scratch:
        payload = {"format": FORMAT, "spec": meta.get("spec"), "state_dict": state}
        torch.save(payload, Path(scratch) / MODEL_FILE)
        try:
            return load_model(Path(scratch), device)
        except ShrinkflowError as e:  # it names the scratch file: name the archive instead
            raise ShrinkflowError(f"{path}: {str(e).split(': ', 1)[-1]}") from None
