"""The TensorFlow model registry: the PyTorch registry's CNNs rebuilt as tf-keras functional models.

Names, depths, widths, shortcut kinds and initialisation follow ``backends/torch/models.py``,
so ``resnet20`` is the same network on both backends and their results can sit side by side.
Layer names mirror torch's module names with ``_`` for ``.`` (``layer1_0_conv1``, ``fc``), so a
``prune.exclude`` pattern means the same layers on both backends where the patterns use no dots.

Every model takes raw pixels, float32 ``(B, image_size, image_size, in_channels)`` on the
0..255 scale, and normalises them itself (``Rescaling`` then ``Normalization`` with the
training split's mean and std): a saved model or ``.tflite`` file is deployable as it is, and
TFLite's full-integer conversion can take uint8 pixels as its input. The output is logits.

tf-keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``) is used because tfmot's pruning wrappers need it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import tf_keras as keras  # noqa: E402
from tf_keras import layers  # noqa: E402

from shrinkflow.backends.base import check_model_args  # noqa: E402

OUTPUT_LAYER = "fc"  # every model's logits layer (``prune.exclude``'s ``output``)

# (symbolic input, num_classes, image_size) -> symbolic logits
ModelFactory = Callable[[Any, int, int], Any]
_REGISTRY: dict[str, ModelFactory] = {}


# torchvision's initialisation, which the torch registry applies to every model. A fresh
# initializer per layer: an unseeded instance shared by layers gives them all the same values.
def _conv_init() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _dense_init() -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, 0.01)


_BN = {"momentum": 0.9, "epsilon": 1e-5}  # torch's BatchNorm2d defaults (momentum 0.1 there)


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``fn(normalised_input, num_classes, image_size) -> logits``."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    factory: str | None = None,
) -> keras.Model:
    """Build the registered model ``name`` with freshly initialised weights.

    Args:
        mean, std: per-channel statistics on the 0..1 scale (``PreparedData.mean/std``); the
            model normalises its 0..255 input with them. Default: 0.5 and 0.25 per channel.
        factory: the ``custom_models`` ref that builds ``name`` when it is not a registry
            model (``custom.build``).

    The initial weights depend only on TensorFlow's global seed, so
    ``keras.utils.set_random_seed`` before this call makes them reproducible.
    """
    known = [name] if factory else list_models()
    check_model_args("tensorflow", name, known, num_classes, in_channels, image_size)
    mean = [0.5] * in_channels if mean is None else [float(m) for m in mean]
    std = [0.25] * in_channels if std is None else [float(s) for s in std]
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values each, got {len(mean)}/{len(std)}")
    if factory:
        from shrinkflow.backends.tensorflow import custom

        return custom.build(
            name, factory, num_classes, in_channels, image_size, mean, std, OUTPUT_LAYER
        )
    inputs = keras.Input((image_size, image_size, in_channels), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalize")(x)
    logits = _REGISTRY[name](x, num_classes, image_size)
    return keras.Model(inputs, logits, name=name)


def model_params(name: str) -> int:
    """Parameters of ``name`` built for 10 classes of 3x32x32 images (`shrinkflow models`):
    its trainable variables, as torch counts ``parameters()`` (``weights.count_params``)."""
    model = create_model(name, 10, in_channels=3, image_size=32)
    return sum(int(v.shape.num_elements()) for v in model.weights if v.trainable)


def _conv(x, filters: int, kernel: int, stride: int, name: str, bias: bool = False):
    """torch's ``conv3x3``/``conv1x1``: 'same' padding at stride 1, (k-1)/2 zero padding above.

    Keras' 'same' pads asymmetrically at stride 2 (more on the bottom/right), torch pads both
    sides, so strided convs pad explicitly to compute what the torch model computes.
    """
    if stride > 1 and kernel > 1:
        x = layers.ZeroPadding2D((kernel - 1) // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return layers.Conv2D(
        filters,
        kernel,
        stride,
        padding=padding,
        use_bias=bias,
        kernel_initializer=_conv_init(),
        name=name,
    )(x)


def _bn(x, name: str):
    return layers.BatchNormalization(**_BN, name=name)(x)


def _basic_block(x, planes: int, stride: int, name: str):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, plus a 1x1 conv + BN projection when the
    shape changes, then ReLU after the add."""
    out = layers.ReLU(name=f"{name}_relu1")(
        _bn(_conv(x, planes, 3, stride, f"{name}_conv1"), f"{name}_bn1")
    )
    out = _bn(_conv(out, planes, 3, 1, f"{name}_conv2"), f"{name}_bn2")
    if stride != 1 or x.shape[-1] != planes:
        x = _bn(_conv(x, planes, 1, stride, f"{name}_downsample_0"), f"{name}_downsample_1")
    return layers.ReLU(name=f"{name}_relu2")(layers.Add(name=f"{name}_add")([out, x]))


def _bottleneck(x, planes: int, stride: int, name: str):
    """torchvision's Bottleneck (stride on the 3x3 conv, expansion 4)."""
    out = layers.ReLU(name=f"{name}_relu1")(
        _bn(_conv(x, planes, 1, 1, f"{name}_conv1"), f"{name}_bn1")
    )
    out = layers.ReLU(name=f"{name}_relu2")(
        _bn(_conv(out, planes, 3, stride, f"{name}_conv2"), f"{name}_bn2")
    )
    out = _bn(_conv(out, planes * 4, 1, 1, f"{name}_conv3"), f"{name}_bn3")
    if stride != 1 or x.shape[-1] != planes * 4:
        x = _bn(_conv(x, planes * 4, 1, stride, f"{name}_downsample_0"), f"{name}_downsample_1")
    return layers.ReLU(name=f"{name}_relu3")(layers.Add(name=f"{name}_add")([out, x]))


def _classifier(x, num_classes: int):
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return layers.Dense(num_classes, kernel_initializer=_dense_init(), name=OUTPUT_LAYER)(x)


def _resnet(x, block, stages: Sequence[tuple[int, int, int]], stem: int, num_classes: int):
    """A stem conv + BN + ReLU, then ``(planes, blocks, stride)`` stages named layer1.."""
    x = layers.ReLU(name="relu")(_bn(_conv(x, stem, 3, 1, "conv1"), "bn1"))
    for s, (planes, blocks, stride) in enumerate(stages, start=1):
        for i in range(blocks):
            x = block(x, planes, stride if i == 0 else 1, f"layer{s}_{i}")
    return _classifier(x, num_classes)


def _cifar_resnet(depth: int) -> ModelFactory:
    """He et al. (2016) CIFAR ResNet-(6n+2), 16/32/64 channels, projection shortcuts."""
    n = (depth - 2) // 6

    def build(x, num_classes: int, image_size: int):
        return _resnet(x, _basic_block, [(16, n, 1), (32, n, 2), (64, n, 2)], 16, num_classes)

    return build


for _depth in (20, 32, 44, 56):
    register(f"resnet{_depth}")(_cifar_resnet(_depth))


@register("resnet18")
def resnet18(x, num_classes: int, image_size: int):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    return _resnet(
        x, _basic_block, [(64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)], 64, num_classes
    )


@register("resnet50")
def resnet50(x, num_classes: int, image_size: int):
    """torchvision's ResNet-50 with the CIFAR stem."""
    return _resnet(
        x, _bottleneck, [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 64, num_classes
    )


# VGG-16's configuration "D": channels, "M" for a 2x2 max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _cifar_vgg(batch_norm: bool) -> ModelFactory:
    """VGG-16 convolutions, global average pooling and one Dense(num_classes), as the torch
    registry's CIFAR VGG; a pool that would leave less than 1x1 is dropped (small inputs)."""

    def build(x, num_classes: int, image_size: int):
        side, index = image_size, 0
        for item in _VGG16:
            if item == "M":
                if side // 2 >= 1:
                    x = layers.MaxPooling2D(2, name=f"features_{index}")(x)
                    side //= 2
                index += 1
                continue
            x = _conv(x, int(item), 3, 1, f"features_{index}", bias=True)
            if batch_norm:
                x = _bn(x, f"features_{index + 1}")
                index += 1
            x = layers.ReLU(name=f"features_{index + 1}")(x)
            index += 2
        return _classifier(x, num_classes)

    return build


register("vgg16")(_cifar_vgg(False))
register("vgg16_bn")(_cifar_vgg(True))


# torchvision's GoogLeNet inception blocks: (name, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5",
# pool projection), and the ceil-mode max-pools between them (kernel, stride), by torch name.
_INCEPTIONS: list[tuple[str, int, int, int, int, int, int] | tuple[str, int, int]] = [
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    ("maxpool3", 3, 2),
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    ("maxpool4", 2, 2),
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
]


def _basic_conv(x, filters: int, kernel: int, name: str):
    """torchvision's ``BasicConv2d``: conv without bias, BN (eps 0.001), ReLU; 'same' padding
    (the 3x3 convs pad 1, the 1x1 convs nothing)."""
    x = _conv(x, filters, kernel, 1, f"{name}_conv")
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _inception(x, name: str, c1: int, c3r: int, c3: int, c5r: int, c5: int, proj: int):
    """torchvision's ``Inception`` block: four branches concatenated on channels. Its third
    branch has a 3x3 conv where the paper has 5x5 (torchvision keeps it for its weights)."""
    b1 = _basic_conv(x, c1, 1, f"{name}_branch1")
    b2 = _basic_conv(_basic_conv(x, c3r, 1, f"{name}_branch2_0"), c3, 3, f"{name}_branch2_1")
    b3 = _basic_conv(_basic_conv(x, c5r, 1, f"{name}_branch3_0"), c5, 3, f"{name}_branch3_1")
    # torch's 3x3 stride-1 max-pool pads 1 with -inf: Keras' 'same' pooling ignores padding.
    pooled = layers.MaxPooling2D(3, 1, padding="same", name=f"{name}_branch4_0")(x)
    b4 = _basic_conv(pooled, proj, 1, f"{name}_branch4_1")
    return layers.Concatenate(name=f"{name}_cat")([b1, b2, b3, b4])


def _ceil_pool(x, kernel: int, stride: int, side: int, name: str):
    """torch's ``MaxPool2d(kernel, stride, ceil_mode=True)`` on a ``side`` x ``side`` input:
    (output, its side); the input itself where the pool would leave less than 1x1, as the torch
    registry drops such pools (``_fit_pools``).

    Ceil mode lets the last window hang over the bottom/right edge; Keras pools only whole
    windows, so the input is zero-padded there first. Zeros stand in for torch's -inf because
    every pooled input follows a ReLU (>= 0) and every window keeps at least one real value.
    """
    out = (side - kernel + stride - 1) // stride + 1
    if (out - 1) * stride >= side:  # the last window must start inside the input
        out -= 1
    if out < 1:
        return x, side
    overhang = (out - 1) * stride + kernel - side
    if overhang > 0:
        x = layers.ZeroPadding2D(((0, overhang), (0, overhang)), name=f"{name}_pad")(x)
    return layers.MaxPooling2D(kernel, stride, name=name)(x), out


@register("googlenet")
def googlenet(x, num_classes: int, image_size: int):
    """torchvision's GoogLeNet with the torch registry's CIFAR stem: a 3x3 stride-1 conv and no
    stem max-pools; no auxiliary heads; dropout 0.2 before the output layer."""
    x = _basic_conv(x, 64, 3, "conv1")
    x = _basic_conv(x, 64, 1, "conv2")
    x = _basic_conv(x, 192, 3, "conv3")
    side = image_size
    for name, *sizes in _INCEPTIONS:
        if name.startswith("maxpool"):
            x, side = _ceil_pool(x, *sizes, side, name)
        else:
            x = _inception(x, name, *sizes)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    return layers.Dense(num_classes, kernel_initializer=_dense_init(), name=OUTPUT_LAYER)(x)
