"""The PyTorch model registry: every registered model builds, trains a step and exports."""

import pytest
import torch
from torch import nn

from shrinkflow.backends.torch import models
from shrinkflow.errors import ShrinkflowError

NUM_CLASSES = 10
# (in_channels, image_size): RGB CIFAR, greyscale digits at their native 8x8, and an odd size
# whose pooling chain rounds down (20 -> 10 -> 5 -> 2 -> 1).
SHAPES = [(3, 32), (1, 8), (2, 20)]


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", models.list_models())
def test_forward_backward(name, in_channels, image_size):
    torch.manual_seed(0)
    model = models.create_model(name, NUM_CLASSES, in_channels, image_size)
    model.train()
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, NUM_CLASSES)
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", models.list_models())
def test_output_layer_name_is_the_logits_layer(name):
    model = models.create_model(name, NUM_CLASSES, in_channels=1, image_size=8).eval()
    layer = model.get_submodule(models.output_layer_name(model))
    assert isinstance(layer, nn.Linear)
    assert layer.out_features == NUM_CLASSES
    seen = []
    layer.register_forward_hook(lambda _module, _args, output: seen.append(output))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert torch.equal(seen[0], out)


@pytest.mark.parametrize("name", models.list_models())
def test_same_seed_same_weights(name):
    def build(seed):
        torch.manual_seed(seed)
        return models.create_model(name, NUM_CLASSES, in_channels=1, image_size=8).state_dict()

    first, again, other = build(0), build(0), build(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", models.list_models())
def test_exports_with_torch_export(name):
    torch.manual_seed(0)
    model = models.create_model(name, NUM_CLASSES, in_channels=1, image_size=8).eval()
    x = torch.randn(2, 1, 8, 8)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_known_models():
    assert models.list_models() == [
        "googlenet",
        "resnet18",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet50",
        "resnet56",
        "vgg16",
        "vgg16_bn",
    ]


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ShrinkflowError) as err:
        models.create_model("nope", NUM_CLASSES)
    message = str(err.value)
    assert "'nope'" in message and "torch" in message and "\n" not in message
    assert all(name in message for name in models.list_models())


@pytest.mark.parametrize(
    "kwargs,fault",
    [
        ({"num_classes": 0}, "num_classes 0"),
        ({"num_classes": 10, "in_channels": 0}, "in_channels 0"),
        ({"num_classes": 10, "image_size": 7}, "image_size 7"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, fault):
    with pytest.raises(ShrinkflowError, match=fault):
        models.create_model("resnet20", **kwargs)


def test_register(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @models.register("tiny")
    def tiny(num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert "tiny" in models.list_models()
    assert models.create_model("tiny", 3, 1, 8)(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="resnet20"):
        models.register("resnet20")(tiny)
    with pytest.raises(ValueError, match="tiny"):
        models.register("tiny")(tiny)


def _num_params(name):
    return sum(p.numel() for p in models.create_model(name, NUM_CLASSES).parameters())


def test_cifar_resnet_parameter_counts():
    # The paper's 0.27M / 0.85M plus the two option-B projections (1x1 conv + BN, 16->32 and
    # 32->64): 512 + 64 + 2048 + 128 = 2,752 parameters.
    assert _num_params("resnet20") == 269_722 + 2_752
    assert _num_params("resnet56") == 853_018 + 2_752


def test_cifar_resnet_has_no_zero_pad_shortcut():
    model = models.create_model("resnet20", NUM_CLASSES)
    projections = [m.downsample for m in model.modules() if getattr(m, "downsample", None)]
    assert len(projections) == 2
    assert all(isinstance(p[0], nn.Conv2d) and p[0].kernel_size == (1, 1) for p in projections)


def _max_pools(model):
    return sum(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_pools_are_dropped_only_where_the_input_is_too_small():
    # At 32x32 the CIFAR VGG keeps all 5 pools (down to 1x1); at 8x8 the last two would leave
    # a map smaller than 1x1. GoogLeNet's stem pools are gone at every size; its other two stay.
    assert _max_pools(models.create_model("vgg16", NUM_CLASSES, image_size=32)) == 5
    assert _max_pools(models.create_model("vgg16", NUM_CLASSES, image_size=8)) == 3
    googlenet = models.create_model("googlenet", NUM_CLASSES, image_size=8)
    outer_pools = [n for n, m in googlenet.named_children() if isinstance(m, nn.MaxPool2d)]
    assert outer_pools == ["maxpool3", "maxpool4"]


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2, stride=2),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.MaxPool2d(2, stride=2, ceil_mode=True),
        nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ],
)
def test_pool_output_side_matches_torch(pool):
    for side in range(1, 40):
        expected = models._pool_output_side(pool, side)
        if expected < 1:
            with pytest.raises(RuntimeError):
                pool(torch.zeros(1, 1, side, side))
        else:
            assert pool(torch.zeros(1, 1, side, side)).shape[-1] == expected, side
