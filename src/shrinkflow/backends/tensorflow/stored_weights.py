"""A TensorFlow node's weights as ``sparse_format.StoredTensor``s, at the precision its file
holds them.

- Keras model (``model.keras``): ``model.weights`` by variable name, kernels sparse float32;
- fixed-point model (``model.fixed.npz``): Conv2D/Dense kernels as ``bits``-bit codes with
  one scale per output channel (the last axis), every other weight as stored;
- TFLite file (``model.tflite``, any conversion method): every constant tensor of the
  flatbuffer, read with LiteRT's schema, as stored (float32, float16, int8 codes, int32 bias
  codes) with the scales and zero points of its quantization parameters; keys are the file's
  tensor names.

A Keras archive's tensors are ``model.weights`` in order: ``model.set_weights([t.dequantize()
for t in sparse_format.load(path).values()])`` on the same architecture (the node's ``.keras``
or ``tf_keras.models.model_from_json``) runs it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402

from shrinkflow import bitpack, sparse_format  # noqa: E402
from shrinkflow.backends.tensorflow import fixed_point, tflite  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import (  # noqa: E402
    FIXED_FILE,
    KERAS_FILE,
    TFLITE_FILE,
    load_model,
    model_file,
    read_spec,
)
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.sparse_format import StoredTensor  # noqa: E402

Meta = dict[str, Any]  # backend, file, format and spec: what the exporter writes in the index
# The numpy type of each TFLite tensor type a converted CNN stores constants in.
_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.BOOL: np.bool_,
}


def stored_weights(model_dir: Path) -> tuple[dict[str, StoredTensor], Meta]:
    """The weights of the model file in ``model_dir`` and the metadata an export records."""
    model_dir = Path(model_dir)
    file = model_file(model_dir)
    meta: Meta = {"backend": "tensorflow", "file": file.name}
    if file.name == TFLITE_FILE:
        meta.update(format="tflite", spec=read_spec(model_dir))
        return tflite_weights(file), meta
    model, spec = load_model(model_dir)  # checks the file and node first
    meta["spec"] = spec
    names = _unique([variable.name for variable in model.weights])
    if file.name == FIXED_FILE:
        meta["format"] = fixed_point.PACKED_FORMAT
        return dict(zip(names, _fixed_weights(file, len(names)), strict=True)), meta
    meta["format"] = KERAS_FILE
    tensors = {}
    for name, variable in zip(names, model.weights, strict=True):
        value = variable.numpy()
        tensors[name] = StoredTensor(value, sparse=sparse_format.is_weight(value))
    return tensors, meta


def _unique(names: list[str]) -> list[str]:
    """``names``, a repeated one suffixed with ``#<position>``."""
    repeated = {n for n in names if names.count(n) > 1}
    return [f"{n}#{i}" if n in repeated else n for i, n in enumerate(names)]


def _fixed_weights(path: Path, count: int) -> list[StoredTensor]:
    """The ``count`` weights of a fixed-point file (already checked by ``load_model``), packed
    kernels as codes."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    bits = int(arrays["bits"])
    tensors = []
    for i in range(count):
        if f"w{i}.value" in arrays:
            value = arrays[f"w{i}.value"]
            tensors.append(StoredTensor(value, sparse=sparse_format.is_weight(value)))
            continue
        shape = tuple(int(n) for n in arrays[f"w{i}.shape"])
        codes = bitpack.unpack(arrays[f"w{i}.codes"], bits, shape)
        axis = len(shape) - 1  # fixed_point.CHANNEL_AXIS, as a position
        scale = arrays[f"w{i}.scale"]
        tensors.append(StoredTensor(codes, sparse=True, scale=scale, axis=axis, bits=bits))
    return tensors


def tflite_weights(path: Path) -> dict[str, StoredTensor]:
    """Every constant tensor of the ``.tflite`` file ``path`` (once per buffer), as stored,
    with its quantization parameters; a one-line error for a file that is not one."""
    tflite.interpreter(path, threads=1, delegates=False)  # refuses what is not a plain model
    data = Path(path).read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    seen, names, tensors = set(), [], []
    try:
        for g in range(model.SubgraphsLength()):
            graph = model.Subgraphs(g)
            for t in range(graph.TensorsLength()):
                tensor = graph.Tensors(t)
                raw = _buffer(model, data, tensor.Buffer())
                if raw is None or tensor.Buffer() in seen:
                    continue
                seen.add(tensor.Buffer())
                names.append(tensor.Name().decode(errors="replace"))
                tensors.append(_constant(tensor, raw))
    except (KeyError, ValueError) as e:
        raise ShrinkflowError(f"{path}: constant tensors not readable ({e})") from None
    return dict(zip(_unique(names), tensors, strict=True))


def _buffer(model: Any, data: bytes, index: int) -> bytes | None:
    """The bytes of buffer ``index`` (inside the flatbuffer or after it); None when empty."""
    if index <= 0 or index >= model.BuffersLength():
        return None  # buffer 0 is the empty sentinel of tensors computed at run time
    buffer = model.Buffers(index)
    if buffer.Offset() > 1:  # a large model's buffers follow the flatbuffer
        raw = data[buffer.Offset() : buffer.Offset() + buffer.Size()]
    else:
        raw = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    return raw or None


def _constant(tensor: Any, raw: bytes) -> StoredTensor:
    """One constant tensor from its bytes, with its scales and zero points where it has them."""
    kind = tensor.Type()
    if kind not in _TYPES:
        raise ValueError(f"tensor type {kind} of {tensor.Name().decode(errors='replace')}")
    shape = tuple(int(n) for n in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
    values = np.frombuffer(raw, dtype=np.dtype(_TYPES[kind]).newbyteorder("<"))
    values = values.astype(values.dtype.newbyteorder("=")).reshape(shape)
    quantization = tensor.Quantization()
    if quantization is None or not quantization.ScaleLength():
        return StoredTensor(values, sparse=sparse_format.is_weight(values))
    sparse = sparse_format.is_weight(values, quantized=True)
    scale = quantization.ScaleAsNumpy()
    zero_point = quantization.ZeroPointAsNumpy() if quantization.ZeroPointLength() else None
    axis = int(quantization.QuantizedDimension()) if len(scale) > 1 else None
    if zero_point is None:
        zero_point = np.zeros(len(scale), np.int64)
    return StoredTensor(values, sparse=sparse, scale=scale, zero_point=zero_point, axis=axis)


def encoding_sizes(model_dir: Path) -> dict[str, int]:
    """``nominal_bytes``, ``sparse_bytes`` and ``sparse_gzip_bytes`` of the model in
    ``model_dir`` (see ``sparse_format``), as ``evaluate`` reports them."""
    return sparse_format.figures(stored_weights(model_dir)[0])
