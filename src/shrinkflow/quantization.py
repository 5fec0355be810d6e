"""The quantization methods a DAG can name, and what each name means (no framework imports).

``quantize.methods`` lists names of three kinds:

- ``static_int8``, ``dynamic_int8``, ``qat_int8``: int8 artefacts with integer kernels;
- ``fixed_w<bits>``: fixed-point weights of ``bits`` bits (2..16), the reference study's sweep
  from 32-bit floats down, one name per bit width so that every width is a node of the DAG;
- ``float32``, ``float16``: the model converted to its backend's deployment format (TFLite)
  with float32 weights, or with float16 weights.

A name means the same idea on every backend that offers it (``backends.base.QUANT_FAMILIES``
says which backend offers which family): torch's static_int8 is PT2E with oneDNN kernels,
TensorFlow's is TFLite full-integer quantization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shrinkflow.errors import ShrinkflowError

INT8_METHODS = ("static_int8", "dynamic_int8", "qat_int8")
FLOAT_METHODS = {"float32": 32, "float16": 16}
FIXED_PREFIX = "fixed_w"
# 1 bit leaves a symmetric code with no non-zero level; above 16 bits the weights are floats
# in all but name (and the 32-bit end of the sweep is the float model itself).
MIN_BITS, MAX_BITS = 2, 16
ALLOWED = (
    f"{', '.join(INT8_METHODS)}, {', '.join(FLOAT_METHODS)}, "
    f"{FIXED_PREFIX}<bits> with bits {MIN_BITS}..{MAX_BITS}"
)

# ASCII digits only, without leading zeros: ``\d`` would also take ``fixed_w٤`` (an Arabic-Indic 4,
# which int() reads as 4) into a node name no DAG path pattern matches, and ``fixed_w04`` would be
# a second node for the same 4-bit weights.
_FIXED = re.compile(rf"{FIXED_PREFIX}([1-9][0-9]*)", re.ASCII)


@dataclass(frozen=True)
class QuantMethod:
    """A parsed method name: ``family`` is static, dynamic, qat, fixed or float; ``bits`` the
    weights' width."""

    name: str
    family: str
    bits: int


def parse_quant_method(name: str, key: str = "--method") -> QuantMethod:
    """The method ``name`` stands for; a ShrinkflowError naming ``key`` if it stands for none."""
    if name in INT8_METHODS:
        return QuantMethod(name, name.removesuffix("_int8"), 8)
    if name in FLOAT_METHODS:
        return QuantMethod(name, "float", FLOAT_METHODS[name])
    match = _FIXED.fullmatch(name)
    if match is None:
        raise ShrinkflowError(f"{key}: {name!r} is not a quantization method (allowed: {ALLOWED})")
    bits = int(match.group(1))
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ShrinkflowError(
            f"{key}: {name!r} asks for {bits}-bit weights; fixed-point widths are "
            f"{MIN_BITS}..{MAX_BITS}"
        )
    return QuantMethod(name, "fixed", bits)


def calibration_count(cfg: dict, train_images: int) -> int:
    """How many batches ``quantize.calibration_batches`` asks to calibrate activations with,
    checked (>= 1, and a training split to draw them from); each backend draws them its way."""
    wanted = int(cfg["quantize"]["calibration_batches"])
    if wanted < 1:
        raise ShrinkflowError(f"quantize.calibration_batches: {wanted} is not in [1, inf)")
    if train_images == 0:
        raise ShrinkflowError("prepared data has no training images to calibrate with")
    return wanted
