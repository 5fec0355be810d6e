"""A model name means the same network on both backends: equal trainable parameter counts."""

import pytest

from shrinkflow.backends.tensorflow.models import list_models, model_params
from shrinkflow.backends.torch import models as torch_models


@pytest.mark.parametrize("name", list_models())
def test_every_tensorflow_model_has_its_torch_twins_parameter_count(name):
    assert model_params(name) == torch_models.model_params(name)


def test_the_tensorflow_registry_is_the_torch_registry_minus_googlenet():
    assert set(torch_models.list_models()) - set(list_models()) == {"googlenet"}
