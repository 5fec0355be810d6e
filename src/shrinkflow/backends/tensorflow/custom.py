"""A ``custom_models`` model on TensorFlow: the user's tf-keras model, made a registry-like one.

The factory (``shrinkflow.custom_models``) returns a tf-keras (Keras 2) functional or Sequential
model of input ``(image_size, image_size, in_channels)`` that maps normalised pixels to
``num_classes`` logits. ``build`` rewrites its config into the registry's shape, one flat
functional model, so that every TensorFlow job treats it as a registry model:

- input ``pixels`` (raw 0..255 float32), then ``rescale`` and ``normalize`` (the training
  split's mean and std) in front of the user's layers, as in ``models.create_model``;
- the Dense layer giving the logits renamed ``fc`` (``models.OUTPUT_LAYER``: ``prune.exclude``'s
  ``output``, the float32 layer under mixed precision);
- the model named after the ``models`` entry (``artifact`` checks a saved model's name).

The weights are the factory's (copied layer by layer). Only the plain layers shrinkflow saves
and loads safely are accepted (``artifact.check_keras_config``): a Lambda or a custom layer
class is refused here, before any training, rather than when the trained model is saved.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import copy  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import tf_keras as keras  # noqa: E402

from shrinkflow import custom_models  # noqa: E402
from shrinkflow.backends.tensorflow.artifact import check_keras_config  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402

INPUT, RESCALE, NORMALIZE = "pixels", "rescale", "normalize"


def build(
    name: str,
    ref: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    output_layer: str,
) -> keras.Model:
    """The model ``ref``'s factory builds for ``name``, checked and rewritten (module docstring)."""
    key = f"custom_models.{name}"
    built = custom_models.build(ref, key, "tensorflow", num_classes, in_channels, image_size)
    user = _functional(built, key, ref)
    shape = (None, image_size, image_size, in_channels)
    if tuple(user.input_shape) != shape:
        raise ShrinkflowError(
            f"{key}: the tensorflow model's input shape is {tuple(user.input_shape)}, "
            f"expected {shape} (image_size x image_size x in_channels)"
        )
    if tuple(user.output_shape) != (None, num_classes):
        raise ShrinkflowError(
            f"{key}: the tensorflow model outputs shape {tuple(user.output_shape)}, "
            f"expected (None, {num_classes}) (one logit per class)"
        )
    config = user.get_config()
    try:
        check_keras_config(Path(key), keras.saving.serialize_keras_object(user))
    except ShrinkflowError as exc:
        refused = str(exc).split(": refusing ", 1)[-1].split(" (", 1)[0]
        raise ShrinkflowError(
            f"{key}: the tensorflow model uses {refused}; shrinkflow saves and loads only "
            "models of built-in tf_keras layers (no Lambda, no custom layer classes) "
            "in safe mode: see docs/custom-models.md"
        ) from None
    renamed = _registry_config(config, name, key, mean, std, output_layer)
    model = keras.Model.from_config(renamed)
    for layer in user.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            target = output_layer if layer.name == _output_name(config) else layer.name
            model.get_layer(target).set_weights(layer.get_weights())
    return model


def _functional(built: Any, key: str, ref: str) -> keras.Model:
    """``built`` as a functional model (a Sequential one is wrapped), or a one-line error."""
    if not isinstance(built, keras.Model):
        what = type(built)
        hint = (
            " (a Keras 3 model: build it with tf_keras, which tfmot needs)"
            if what.__module__.split(".")[0] == "keras"
            else ""
        )
        raise ShrinkflowError(
            f"{key}: {ref} returned a {what.__module__}.{what.__name__}, not a tf_keras Model{hint}"
        )
    if isinstance(built, keras.Sequential):
        if not built.built or not built.inputs:
            raise ShrinkflowError(
                f"{key}: {ref} returned a Sequential model without an input shape "
                "(start it with keras.Input((image_size, image_size, in_channels)))"
            )
        built = keras.Model(built.inputs, built.outputs, name=built.name)
    if not getattr(built, "_is_graph_network", False):
        raise ShrinkflowError(
            f"{key}: {ref} returned a subclassed tf_keras Model; build a functional or "
            "Sequential one (shrinkflow saves models as their layer graph)"
        )
    if len(built.inputs) != 1 or len(built.outputs) != 1:
        raise ShrinkflowError(
            f"{key}: the tensorflow model has {len(built.inputs)} inputs and "
            f"{len(built.outputs)} outputs (one image input, one logits output)"
        )
    return built


def _output_name(config: dict) -> str:
    return config["output_layers"][0][0]


def _registry_config(
    config: dict,
    name: str,
    key: str,
    mean: Sequence[float],
    std: Sequence[float],
    output_layer: str,
) -> dict:
    """The user's functional config with the registry's input, normalisation and output names."""
    config = copy.deepcopy(config)
    layers = config["layers"]
    by_name = {layer["config"]["name"]: layer for layer in layers}
    source_input, source_output = config["input_layers"][0][0], _output_name(config)
    if by_name[source_output]["class_name"] != "Dense":
        raise ShrinkflowError(
            f"{key}: the tensorflow model ends in a {by_name[source_output]['class_name']} "
            "layer; it must end in the Dense layer that gives the logits (no softmax)"
        )
    taken = {RESCALE, NORMALIZE, output_layer} & (set(by_name) - {source_output})
    taken |= {INPUT} & (set(by_name) - {source_input})
    if taken:
        raise ShrinkflowError(
            f"{key}: the tensorflow model has a layer named {sorted(taken)[0]!r}, a name "
            "shrinkflow gives its own layers; rename it"
        )
    renames = {source_input: NORMALIZE, source_output: output_layer}
    for layer in layers:
        layer["inbound_nodes"] = _rename_refs(layer["inbound_nodes"], renames)
        if layer["config"]["name"] == source_output:
            layer["config"]["name"] = layer["name"] = output_layer
    config["output_layers"] = _rename_refs(config["output_layers"], renames)
    head = keras.Sequential(
        [
            keras.layers.Rescaling(1.0 / 255.0, name=RESCALE),
            keras.layers.Normalization(
                mean=[float(m) for m in mean],
                variance=[float(s) ** 2 for s in std],
                name=NORMALIZE,
            ),
        ]
    )
    front = by_name[source_input]
    front["config"]["name"] = front["name"] = INPUT
    rescale, normalize = (
        {
            "class_name": layer.__class__.__name__,
            "config": layer.get_config(),
            "name": layer.name,
            "inbound_nodes": [[[source, 0, 0, {}]]],
        }
        for layer, source in zip(head.layers, (INPUT, RESCALE), strict=True)
    )
    at = layers.index(front) + 1
    config["layers"] = [*layers[:at], rescale, normalize, *layers[at:]]
    config["input_layers"] = [[INPUT, 0, 0]]
    config["name"] = name
    return config


def _rename_refs(nodes: Any, renames: dict[str, str]) -> Any:
    """``nodes`` (inbound nodes, or input/output layer lists) with each ``[layer name, node,
    tensor(, kwargs)]`` reference to a key of ``renames`` pointing at its value instead."""
    if isinstance(nodes, list):
        if (
            len(nodes) in (3, 4)
            and isinstance(nodes[0], str)
            and all(isinstance(i, int) for i in nodes[1:3])
        ):
            return [renames.get(nodes[0], nodes[0]), *nodes[1:]]
        return [_rename_refs(item, renames) for item in nodes]
    if isinstance(nodes, dict):
        return {k: _rename_refs(v, renames) for k, v in nodes.items()}
    return nodes
