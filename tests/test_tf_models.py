"""A model name means the same network on both backends: equal trainable parameter counts."""

import pytest
import torch

from shrinkflow.backends.tensorflow.models import create_model, list_models, model_params
from shrinkflow.backends.torch import models as torch_models


@pytest.mark.parametrize("name", list_models())
def test_every_tensorflow_model_has_its_torch_twins_parameter_count(name):
    assert model_params(name) == torch_models.model_params(name)


def test_the_tensorflow_registry_is_the_torch_registry():
    assert list_models() == torch_models.list_models()


def test_googlenet_pools_like_torch_at_an_odd_image_side():
    """At 15x15 torch's ceil-mode maxpool4 lets its last window hang over the edge (7 -> 4),
    which the Keras twin pads for; classes and channels other than the defaults."""
    keras_model = create_model("googlenet", 7, in_channels=2, image_size=15)
    torch_model = torch_models.create_model("googlenet", 7, in_channels=2, image_size=15)
    sides = {}
    for name in ("maxpool3", "maxpool4"):
        getattr(torch_model, name).register_forward_hook(
            lambda module, args, out, name=name: sides.__setitem__(name, tuple(out.shape[2:]))
        )
    with torch.no_grad():
        torch_model.eval()(torch.zeros(1, 2, 15, 15))
    assert sides == {"maxpool3": (7, 7), "maxpool4": (4, 4)}
    for name, side in sides.items():
        assert keras_model.get_layer(name).output_shape[1:3] == side
    assert keras_model.output_shape == (None, 7)
    assert sum(int(v.shape.num_elements()) for v in keras_model.trainable_weights) == sum(
        p.numel() for p in torch_model.parameters()
    )
