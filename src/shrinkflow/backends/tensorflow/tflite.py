"""TFLite: converting a Keras model, running a ``.tflite`` file, and reading its weights.

Conversion methods (``quantize.methods`` names):

- ``static_int8``: full-integer post-training quantization. Weights int8 per channel,
  activations int8 with ranges calibrated on training batches; the input is uint8 (the model
  takes raw 0..255 pixels, so a calibrated input range of 0..255 makes the input quantization
  scale 1, zero point 0: the pixels themselves). The output stays float32: the final
  dequantize costs ten multiplies, and int8 logits would tie on 256 levels, which would bias
  top-5 toward low class indices.
- ``dynamic_int8``: dynamic-range quantization: int8 weights, float activations (TFLite's
  hybrid kernels quantize activations on the fly). Weight tensors below TFLite's size
  threshold (1024 values, e.g. a 1-channel stem conv) stay float.
- ``float16``: float16 weights, dequantized to float32 when the model is loaded.
- ``float32``: the plain conversion, the deployment-format baseline int8 is compared with.
- ``qat_int8``: the conversion of a model trained quantization-aware (``qat``): the int8
  ranges are those its fake quantizers learned, so no calibration; every conv, add and dense
  runs in int8 (float32 pixels in, float32 logits out, quantized once after the model's float
  preprocessing).

Every file is run by one interpreter (``interpreter``): LiteRT's, the maintained successor of
``tf.lite.Interpreter`` (deprecated since TF 2.20, same kernels and XNNPACK delegate).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import re  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
from ai_edge_litert import schema_py_generated as schema  # noqa: E402
from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402
from ai_edge_litert.schema_py_generated import BuiltinOperator  # noqa: E402

from shrinkflow.backends.native_log import filtered_stderr  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import read_spec  # noqa: E402
from shrinkflow.backends.tensorflow.weights import Counts, count_weights  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.nodes import NODE_FILE, check_artifact  # noqa: E402

METHODS = ("static_int8", "dynamic_int8", "float16", "float32")  # of a float model
QAT_METHOD = "qat_int8"  # of a model trained quantization-aware
BITS = {"static_int8": 8, "dynamic_int8": 8, "float16": 16, "float32": 32, QAT_METHOD: 8}

# The ops that hold a model's conv and dense weights (input 1: filter, input 2: bias) and
# whose multiply-accumulates are counted, as torch counts its convolutions and matrix products.
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_REDUCED = (np.int8, np.float16)  # stored filter types that count as a quantized layer
# A tensor's name lists the TensorFlow ops the converter fused into it, separated by ";", each
# as "<model>/<Keras layer>/<op><n>" ("resnet20/relu/Relu;resnet20/conv1/Conv2D",
# "resnet20/fc/MatMul1"): a layer is the scope of a conv or matmul op.
# TFLite's builtin operators, less those that hand the graph to code outside the file's ops
# (a custom op's name is its custom code, e.g. FlexWriteFile for a Select-TensorFlow op).
_OP_NAMES = {
    code: name
    for name, code in vars(BuiltinOperator).items()
    if name.isupper() and not name.startswith("_")
}
_FOREIGN = {"CUSTOM", "DELEGATE", "STABLEHLO_CUSTOM_CALL", "STABLEHLO_COMPOSITE"}
_BUILTIN_OPS = frozenset(_OP_NAMES.values()) - _FOREIGN
_LAYER_OP = re.compile(r"(?:.*/)?([^/]+)/(?:Conv2D|depthwise|MatMul|BiasAdd)\d*")


def default_threads() -> int:
    """The threads TensorFlow computes with: its intra-op setting, or where that is 0 (the
    default) the CPUs this process may run on, which TensorFlow then uses. TFLite runs with
    the same number, so a Keras model and its ``.tflite`` are timed alike."""
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured:
        return configured
    # sched_getaffinity honours CPU limits (taskset, Slurm); macOS has only the CPU count.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(model: keras.Model, method: str, calibration: list[np.ndarray]) -> bytes:
    """``model`` as a ``.tflite`` flatbuffer by ``method``; ``calibration`` (raw float32
    pixel batches) is used by ``static_int8`` only. ``qat_int8`` takes a tfmot
    quantization-aware model.

    The converter gets a concrete function whose variables a plain ``tf.Module`` holds: given
    the Keras model itself it exports a Keras SavedModel first, re-tracing every layer (7 s
    instead of 1 s for a ResNet-20), and given nothing it takes a deprecated path.
    """
    forward = tf.function(
        lambda pixels: model(pixels, training=False),
        input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)],
    )
    holder = tf.Module()
    holder.weights = list(model.variables)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], holder
    )
    if method != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if method == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if method == "static_int8":
        converter.representative_dataset = lambda: ([batch] for batch in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
    with filtered_stderr(), warnings.catch_warnings():
        # A QAT model's float input has no range of its own (it is quantized after the
        # preprocessing), which the converter warns about on every conversion.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
        return converter.convert()


@dataclass(frozen=True)
class FileOp:
    """One operator of a ``.tflite`` file's main subgraph, as the file lists it."""

    name: str  # TFLite's builtin operator name (CONV_2D), or a custom op's custom code
    inputs: tuple[int, ...]  # tensor indices; -1 for an optional input left out
    outputs: tuple[int, ...]


def file_ops(path: Path) -> list[FileOp]:
    """The operators of the ``.tflite`` file ``path``'s main subgraph, in the order an
    interpreter without delegates runs them, read with LiteRT's flatbuffer schema
    (``schema_py_generated``): the interpreter lists its ops through a private method only."""
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 are only in builtin_code; older files only fill the deprecated field.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        if builtin == BuiltinOperator.CUSTOM and custom:
            names.append(custom.decode(errors="replace"))
        else:
            names.append(_OP_NAMES.get(builtin, f"builtin operator {builtin}"))
    graph = model.Subgraphs(0)
    ops = []
    for j in range(graph.OperatorsLength()):
        op = graph.Operators(j)
        inputs = tuple(int(op.Inputs(k)) for k in range(op.InputsLength()))
        outputs = tuple(int(op.Outputs(k)) for k in range(op.OutputsLength()))
        ops.append(FileOp(names[op.OpcodeIndex()], inputs, outputs))
    return ops


def interpreter(path: Path, threads: int, delegates: bool = True) -> Interpreter:
    """An interpreter of the ``.tflite`` file ``path``; a one-line error if it is not one.

    ``delegates=False`` leaves out the default XNNPACK delegate, which repacks the weights
    and takes over the graph: inspection then sees the file's own ops and constant tensors.
    """
    resolver = (
        OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    try:
        loaded = Interpreter(
            model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver
        )
        ops = [op.name for op in file_ops(path)]
    except (ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ShrinkflowError(f"{path}: not a readable TFLite model ({reason})") from None
    # Checked before allocate_tensors, which is where delegates take over the graph.
    foreign = [op for op in ops if op not in _BUILTIN_OPS]
    if foreign:
        raise ShrinkflowError(
            f"{path}: refusing op {foreign[0]!r}: a model file may use TFLite's builtin "
            "operators only (custom and Select-TensorFlow ops run code outside the model)"
        )
    folder = Path(path).parent
    if (folder / NODE_FILE).is_file():
        spec = read_spec(folder)
        check_artifact(folder, backend="tensorflow", arch=spec["arch"], kind="tflite")
    return loaded


class Runner:
    """One interpreter of a ``.tflite`` file prepared for batches of exactly ``batch`` images.

    ``feed`` turns raw uint8 pixels into the input the file expects; calling the runner with
    it returns float32 logits. The tensor arena (the activations' memory) is allocated by the
    first call, as an eager framework allocates its activations during its first pass, so
    that ``evaluate``'s peak memory of a first inference sees it.
    """

    def __init__(self, path: Path, batch: int, threads: int) -> None:
        self.batch = batch
        self._interpreter = interpreter(path, threads)
        (source,) = self._interpreter.get_input_details()
        (target,) = self._interpreter.get_output_details()
        if source["dtype"] not in (np.uint8, np.float32) or target["dtype"] != np.float32:
            raise ShrinkflowError(
                f"{path}: input {np.dtype(source['dtype']).name}, output "
                f"{np.dtype(target['dtype']).name}; shrinkflow runs uint8 or float32 input "
                "and float32 output"
            )
        self._interpreter.resize_tensor_input(source["index"], [batch, *source["shape"][1:]])
        self._allocated = False
        self._input, self._output = source["index"], target["index"]
        self._dtype = np.dtype(source["dtype"])
        # (scale, zero point) of a uint8 input: real value = scale * (code - zero point)
        self.input_scale, self.input_zero_point = source["quantization"]

    def feed(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(batch, H, W, C)`` pixels as the input tensor's type: float32 pixel values,
        or for a uint8 input their quantized codes (the pixels themselves at scale 1, zero
        point 0, the quantization a 0..255 calibration range gives)."""
        pixels = images.astype(np.float32)
        if self._dtype == np.uint8:
            codes = np.round(pixels / self.input_scale) + self.input_zero_point
            return np.clip(codes, 0, 255).astype(np.uint8)
        return pixels

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not self._allocated:
            with filtered_stderr():
                self._interpreter.allocate_tensors()
            self._allocated = True
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)


@dataclass(frozen=True)
class OpTypes:
    """The element types of one conv or dense op of a ``.tflite`` file, as its tensors hold
    them: the activation it reads, its filter and its output."""

    op: str
    output_name: str
    input: np.dtype
    filter: np.dtype
    output: np.dtype

    @property
    def all_int8(self) -> bool:
        """Integer arithmetic end to end: int8 activations in and out, int8 weights."""
        return self.input == self.filter == self.output == np.dtype(np.int8)

    def describe(self) -> str:
        return (
            f"{self.op} {self.output_name!r}: input {self.input.name}, filter "
            f"{self.filter.name}, output {self.output.name}"
        )


def weight_op_types(path: Path) -> list[OpTypes]:
    """The element types of every conv and dense op of the file ``path``, as the interpreter
    (without delegates) reports its tensors: a full-integer file has int8 throughout."""
    inspector = interpreter(path, threads=1, delegates=False)
    types = {d["index"]: (np.dtype(d["dtype"]), d["name"]) for d in inspector.get_tensor_details()}
    return [
        OpTypes(
            op.name,
            types[op.outputs[0]][1],
            types[op.inputs[0]][0],
            types[op.inputs[1]][0],
            types[op.outputs[0]][0],
        )
        for op in file_ops(path)
        if op.name in WEIGHT_OPS
    ]


@dataclass(frozen=True)
class WeightLayer:
    """The stored weights of one conv or dense op of a ``.tflite`` file."""

    name: str  # the Keras layer it came from, where its tensor names tell (see layer_name)
    op: str
    filter: np.ndarray  # as stored: float32, float16 or int8 codes
    bias: np.ndarray | None
    macs: int  # multiply-accumulates of one image


def weight_layers(path: Path) -> list[WeightLayer]:
    """The conv and dense ops of the file ``path``, with their weights as the file stores them.

    A float16 filter reaches its op through a DEQUANTIZE op; the stored tensor is the
    DEQUANTIZE's input. MACs are counted at batch 1 (filter size times output positions), so
    they match ``evaluate.count_macs`` of the Keras model the file came from.
    """
    inspector = interpreter(path, threads=1, delegates=False)
    (source,) = inspector.get_input_details()
    inspector.resize_tensor_input(source["index"], [1, *source["shape"][1:]])
    inspector.allocate_tensors()
    ops = file_ops(path)
    details = inspector.get_tensor_details()
    shapes = {d["index"]: d["shape"] for d in details}
    names = {d["index"]: d["name"] for d in details}
    dequantized = {op.outputs[0]: op.inputs[0] for op in ops if op.name == "DEQUANTIZE"}

    def stored(index: int) -> np.ndarray:
        return inspector.get_tensor(dequantized.get(index, index))

    layers = []
    for op in ops:
        if op.name not in WEIGHT_OPS:
            continue
        inputs, output = op.inputs, op.outputs[0]
        weights = stored(inputs[1])
        bias = stored(inputs[2]) if len(inputs) > 2 and inputs[2] >= 0 else None
        positions = int(np.prod(shapes[output][:-1]))
        name = layer_name(names[dequantized.get(inputs[1], inputs[1])], names[output])
        layers.append(WeightLayer(name, op.name, weights, bias, int(weights.size) * positions))
    return layers


def layer_name(*tensor_names: str) -> str:
    """The Keras layer named by the first of ``tensor_names`` (an op's filter, then its output)
    that names one; else the first name as it stands (a converter constant such as
    ``arith.constant3``)."""
    for name in tensor_names:
        for part in name.split(";"):
            if match := _LAYER_OP.fullmatch(part):
                return match.group(1)
    return tensor_names[0]


def quantized_layers(layers: list[WeightLayer]) -> int:
    """How many of ``layers`` store their filter as int8 or float16."""
    return sum(layer.filter.dtype in _REDUCED for layer in layers)


def count_params(layers: list[WeightLayer]) -> Counts:
    """``evaluate``'s parameter counts for a ``.tflite`` file, from its conv and dense ops
    (``weights.count_weights``; ``layer_sparsity`` in the file's op order, by ``layer_name``).

    ``params`` are the filters and biases those ops hold: batch norm is folded into them by the
    converter, so a file has fewer parameters than its Keras model (one bias per channel in
    place of batch norm's scale and shift). A zero is a stored zero (int8 weights are
    symmetric: code 0 is the value 0).
    """
    filters = [layer.filter for layer in layers]
    tensors = filters + [layer.bias for layer in layers if layer.bias is not None]
    return count_weights(tensors, [(layer.name, layer.filter) for layer in layers])
