"""The PyTorch model registry: small-image (CIFAR-style) CNNs built from torchvision's blocks.

Constructors register themselves with ``@register(name)`` (as in timm) and are built through
``create_model``, which validates the arguments and applies one weight initialisation to every
model, so that models differ only in architecture.

Every model maps ``(B, in_channels, image_size, image_size)`` to ``(B, num_classes)`` logits for
any ``in_channels >= 1`` and ``image_size >= MIN_IMAGE_SIZE``. Models are built only from
``nn.Module`` children (no lambdas, no data-dependent Python control flow) so that Torch-Pruning
can trace their dependency graph and ``torch.export`` can capture them.
"""

from collections import OrderedDict
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models import resnet as tv_resnet
from torchvision.models.googlenet import BasicConv2d
from torchvision.models.resnet import conv1x1, conv3x3

from shrinkflow import custom_models
from shrinkflow.backends.base import check_model_args
from shrinkflow.errors import ShrinkflowError

ModelFactory = Callable[[int, int, int], nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a constructor ``fn(num_classes, in_channels, image_size) -> nn.Module``."""

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
    factory: str | None = None,
) -> nn.Module:
    """Build the registered model ``name`` with freshly initialised weights.

    Args:
        num_classes: width of the output layer.
        in_channels: input channels (3 for RGB, 1 for greyscale such as digits).
        image_size: side of the square input; decides which pooling layers are kept.
        factory: the ``custom_models`` ref that builds ``name`` when it is not a registry
            model; its weights are the factory's own (see ``_create_custom``).

    The initial weights depend only on torch's global RNG, so ``torch.manual_seed`` before this
    call makes them reproducible.
    """
    known = [name] if factory else list_models()
    check_model_args("torch", name, known, num_classes, in_channels, image_size)
    if factory:
        return _create_custom(name, factory, num_classes, in_channels, image_size)
    model = _REGISTRY[name](num_classes, in_channels, image_size)
    _init_weights(model)
    return model


def _create_custom(
    name: str, factory: str, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """The model a ``custom_models`` factory builds, checked: an ``nn.Module`` that maps a
    ``(1, in_channels, image_size, image_size)`` input to ``(1, num_classes)`` logits.

    The factory's initialisation is kept (the user chose it); ``torch.manual_seed`` before
    this call still makes it reproducible.
    """
    key = f"custom_models.{name}"
    model = custom_models.build(factory, key, "torch", num_classes, in_channels, image_size)
    if not isinstance(model, nn.Module):
        kind = type(model)
        raise ShrinkflowError(
            f"{key}: {factory} returned a {kind.__module__}.{kind.__name__}, not a torch nn.Module"
        )
    shape = (1, in_channels, image_size, image_size)
    training = model.training
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(shape))
    except Exception as e:  # the user's forward: any exception, on one line
        raise ShrinkflowError(
            f"{key}: the torch model fails on a {shape} input ({custom_models.one_line(e)})"
        ) from None
    finally:
        model.train(training)
    got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
    if got != (1, num_classes):
        raise ShrinkflowError(
            f"{key}: the torch model outputs {got} for a {shape} input, expected "
            f"(1, {num_classes}) (one logit per class)"
        )
    return model


def model_params(name: str) -> int:
    """Parameters of ``name`` built for 10 classes of 3x32x32 images (`shrinkflow models`)."""
    return sum(p.numel() for p in create_model(name, 10, in_channels=3, image_size=32).parameters())


def output_layer_name(model: nn.Module) -> str:
    """The qualified name of the layer producing the logits (the model's final ``nn.Linear``).

    Pruning excludes this layer by default: removing its output units would remove classes.
    Every registered model declares its classifier after all its other layers, so the final
    ``nn.Linear`` in ``named_modules()`` order is the output layer ("fc" for the ResNets and
    GoogLeNet, "classifier" for the VGGs); after ``torch.nn.utils.prune`` or Torch-Pruning the
    name is unchanged.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ShrinkflowError(f"model {type(model).__name__} has no nn.Linear output layer")
    return names[-1]


def _init_weights(model: nn.Module) -> None:
    """torchvision's scheme (as in its VGG and ResNet), applied to every model alike."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _pool_output_side(pool: nn.MaxPool2d, side: int) -> int:
    """Output side of a square max-pool, with PyTorch's formula (including ceil_mode)."""
    kernel, stride, padding, dilation = (
        p if isinstance(p, int) else p[0]
        for p in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)
    )
    span = side + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if pool.ceil_mode else 0)) // stride + 1
    # With ceil_mode the last window must still start inside the (left-padded) input.
    if pool.ceil_mode and (out - 1) * stride >= side + padding:
        out -= 1
    return out


def _fit_pools(parent: nn.Module, names: list[str], side: int) -> None:
    """Replace with ``nn.Identity`` the pools (in forward order) that would leave less than 1x1.

    Only the pools listed change the spatial size between them (every other layer keeps it),
    so the side can be followed pool by pool. A pool is kept while its output is at least 1x1,
    not 2x2, so that at 32x32 the networks are exactly the standard CIFAR ones (the CIFAR VGG
    pools down to 1x1); at smaller inputs only the trailing pools become identities. Modules are
    replaced in place, so parameter names stay those of torchvision.
    """
    for name in names:
        pool = getattr(parent, name)
        out = _pool_output_side(pool, side)
        if out < 1:
            setattr(parent, name, nn.Identity())
        else:
            side = out


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock, computing the same function with a ReLU module used once.

    torchvision calls its block's one ``nn.ReLU`` twice. Quantizers that match patterns per
    source module (torchao's PT2E ``X86InductorQuantizer``) then see one ReLU "partition" with
    two outputs and refuse the model; the activation after the residual add is therefore a
    ``F.relu`` call of its own. Parameter names and values are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torchvision's order (main path, then shortcut): Torch-Pruning names groups by it
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck with each ReLU a call of its own (see ``BasicBlock``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet: a 3x3 stem, then 3 stages of 16/32/64 channels.

    Shortcuts that change shape are a 1x1 conv + BN projection (option B) rather than the
    paper's zero-padding lambda (option A), so the residual dependencies are ordinary modules
    that structured pruning can trace.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        # Three stages of n two-conv blocks, plus the stem conv and the classifier: 6n + 2.
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                block_stride = stride if i == 0 else 1
                downsample = None
                if block_stride != 1 or planes_in != planes:
                    downsample = nn.Sequential(
                        conv1x1(planes_in, planes, block_stride), nn.BatchNorm2d(planes)
                    )
                blocks.append(BasicBlock(planes_in, planes, block_stride, downsample))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet20")
def resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


@register("resnet32")
def resnet32(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels)


@register("resnet44")
def resnet44(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(44, num_classes, in_channels)


@register("resnet56")
def resnet56(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return CifarResNet(56, num_classes, in_channels)


def _small_image_resnet(
    block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, in_channels: int
) -> nn.Module:
    """torchvision's ImageNet ResNet with the usual CIFAR stem: 3x3 stride-1 conv, no max-pool.

    The ImageNet stem divides the side by 4 before the first stage, which would leave a 32x32
    input at 1x1 by the last stage. Its four strided stages never shrink a map below 1x1 (a
    stride-2 conv with padding maps side s to ceil(s / 2)), so no pool needs fitting.
    """
    model = tv_resnet.ResNet(block, layers, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register("resnet18")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _small_image_resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@register("resnet50")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _small_image_resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)


def _cifar_vgg(batch_norm: bool, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """VGG-16 convolutions, global average pooling and one Linear(512, num_classes).

    torchvision's 4096-wide ImageNet classifier would hold ~90 % of the parameters at 32x32, so
    the CIFAR VGG keeps only the features. Layer names match torchvision's VGG ("features.N",
    "classifier").
    """
    features = torchvision.models.vgg.make_layers(
        torchvision.models.vgg.cfgs["D"], batch_norm=batch_norm
    )
    features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    pools = [n for n, m in features.named_children() if isinstance(m, nn.MaxPool2d)]
    _fit_pools(features, pools, image_size)
    return nn.Sequential(
        OrderedDict(
            features=features,
            avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            classifier=nn.Linear(512, num_classes),
        )
    )


@register("vgg16")
def vgg16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _cifar_vgg(False, num_classes, in_channels, image_size)


@register("vgg16_bn")
def vgg16_bn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return _cifar_vgg(True, num_classes, in_channels, image_size)


@register("googlenet")
def googlenet(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision's GoogLeNet with the well-known CIFAR stem: 3x3 stride-1, no stem pools.

    Auxiliary heads are off (so the forward pass returns a plain tensor in training and eval
    alike) and torchvision's own initialisation is skipped because ``create_model`` applies
    the common one.
    """
    model = torchvision.models.googlenet(
        weights=None,
        num_classes=num_classes,
        aux_logits=False,
        transform_input=False,
        init_weights=False,
    )
    model.conv1 = BasicConv2d(in_channels, 64, kernel_size=3, stride=1, padding=1)
    model.maxpool1 = nn.Identity()
    model.maxpool2 = nn.Identity()
    _fit_pools(model, ["maxpool3", "maxpool4"], image_size)
    return model
