"""A model name means the same network on both backends: equal trainable parameter counts."""

import pytest

from shrinkflow.backends.base import get_backend
from shrinkflow.backends.tensorflow.models import list_models


@pytest.mark.parametrize("name", list_models())
def test_every_tensorflow_model_has_its_torch_twins_parameter_count(name):
    torch_count = get_backend("torch").count_params(name)
    assert get_backend("tensorflow").count_params(name) == torch_count


def test_the_tensorflow_registry_is_the_torch_registry_minus_googlenet():
    assert set(get_backend("torch").list_models()) - set(list_models()) == {"googlenet"}
