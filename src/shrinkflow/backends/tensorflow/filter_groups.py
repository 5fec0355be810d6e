"""Which filters of a Keras functional model must leave together, and the smaller model left.

The graph is read from the model's config (layer by layer, in the order Keras stores them,
which is topological). Every tensor is described by the *channel spaces* its last axis is made
of: a Conv2D or Dense layer starts a new space (its filters); batch norms, depthwise convs
(depth multiplier 1), activations, pooling, padding and dropout pass their input's spaces on;
``Concatenate`` on the channel axis lays its inputs' spaces end to end; ``Flatten`` repeats
them once per spatial position; ``Add`` (and the other element-wise merges) joins its inputs'
spaces into one, because summed channels must stay aligned. The spaces joined into one form a
*layer group*: its conv/dense members lose the same filters, and every layer reading them
(batch norms, the next convs' and dense layers' inputs) loses the matching slices.

A space is *pinned* (never pruned) when it is the model's input or output, when an excluded
layer produces it, or when any layer this module cannot slice reads it (Reshape, grouped
convs, a Rescaling or Normalization with per-channel values, ...): such layers keep their
inputs whole and start pinned spaces of their own, so any functional model can be pruned as far
as its graph allows, and a group holding a pinned member is left whole.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before tensorflow: tfmot needs Keras 2

import copy  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import tf_keras as keras  # noqa: E402

from shrinkflow.backends.tensorflow.weights import resolve_exclude  # noqa: E402
from shrinkflow.errors import ShrinkflowError  # noqa: E402
from shrinkflow.structured_ratios import LayerGroup  # noqa: E402

# Layers that keep each channel apart and hold no per-channel weights.
_PASS = frozenset(
    """ReLU Activation Dropout SpatialDropout2D GaussianNoise GaussianDropout MaxPooling2D
    AveragePooling2D GlobalAveragePooling2D GlobalMaxPooling2D ZeroPadding2D Cropping2D
    UpSampling2D""".split()  # noqa: SIM905
)
# Element-wise merges: their inputs' channels line up one to one.
_MERGE = frozenset("Add Subtract Multiply Average Maximum Minimum".split())  # noqa: SIM905


@dataclass
class _Layout:
    """The channel spaces along a tensor's last axis: ``(space, size)`` segments end to end,
    repeated ``repeat`` times after a Flatten (flat index = position * channels + channel)."""

    segments: list[tuple[int, int]]
    repeat: int = 1

    @property
    def channels(self) -> int:
        return sum(size for _, size in self.segments)


@dataclass
class _Role:
    """How pruning changes one layer: ``producer`` (Conv2D/Dense: input slices and filters),
    ``channelwise`` (batch norm, depthwise conv: one slice per input channel) or ``other``."""

    kind: str
    inputs: _Layout | None = None
    space: int | None = None  # a producer's own space


@dataclass
class FilterGraph:
    """The channel spaces of a model and how each layer touches them (see the module
    docstring); ``groups`` are the prunable ones in forward order."""

    model: keras.Model
    roles: dict[str, _Role]
    parent: list[int]
    pinned: list[bool]
    sizes: list[int]
    producers: dict[int, str]  # space -> the layer that makes it
    groups: list[LayerGroup] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # unpinned root space -> group name

    def root(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def group_of(self, space: int) -> str | None:
        """The name of the group ``space`` belongs to, or None if it is pinned."""
        root = self.root(space)
        if self.pinned[root]:
            return None
        return self.names[root]

    def input_index(self, layout: _Layout, keep: dict[str, np.ndarray]) -> np.ndarray:
        """The kept positions along a tensor's last axis, given each group's kept channels."""
        parts, offset = [], 0
        for space, size in layout.segments:
            name = self.group_of(space)
            kept = np.arange(size) if name is None or name not in keep else keep[name]
            parts.append(offset + np.asarray(kept, dtype=np.int64))
            offset += size
        per_position = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        positions = np.arange(layout.repeat)[:, None] * offset
        return (positions + per_position[None, :]).reshape(-1)

    def finish(self) -> None:
        order = {layer.name: i for i, layer in enumerate(self.model.layers)}
        members: dict[int, list[str]] = {}
        for space, layer in self.producers.items():
            root = self.root(space)
            if not self.pinned[root]:
                members.setdefault(root, []).append(layer)
        groups = []
        for root, names in members.items():
            names.sort(key=order.__getitem__)
            self.names[root] = names[0]
            groups.append(LayerGroup(names[0], tuple(names), self.sizes[root]))
        self.groups = sorted(groups, key=lambda g: order[g.name])


def filter_graph(model: keras.Model, exclude: Sequence[str]) -> FilterGraph:
    """The layer groups of ``model``; the conv/dense layers ``exclude`` matches (``output``:
    the logits layer) keep all their filters, and so does every group holding one."""
    excluded = set(resolve_exclude(model, exclude))
    graph = FilterGraph(model, {}, [], [], [], {})

    def new_space(size: int, pinned: bool) -> int:
        graph.parent.append(len(graph.parent))
        graph.pinned.append(pinned)
        graph.sizes.append(size)
        return len(graph.parent) - 1

    def pin(layout: _Layout) -> None:
        for space, _ in layout.segments:
            graph.pinned[graph.root(space)] = True

    def union(a: int, b: int) -> None:
        ra, rb = graph.root(a), graph.root(b)
        if ra != rb:
            graph.parent[rb] = ra
            graph.pinned[ra] = graph.pinned[ra] or graph.pinned[rb]

    def fresh(layer: keras.layers.Layer) -> _Layout:
        shape = layer.output_shape
        shape = shape[0] if isinstance(shape, list) and len(shape) == 1 else shape
        channels = shape[-1] if isinstance(shape, tuple) else None
        return _Layout([(new_space(int(channels or 0), True), int(channels or 0))])

    layouts: dict[str, _Layout] = {}
    for entry in model.get_config()["layers"]:
        name, cls, config = entry["name"], entry["class_name"], entry["config"]
        layer = model.get_layer(name)
        nodes = entry["inbound_nodes"]
        if len(nodes) > 1:
            raise ShrinkflowError(
                f"structured pruning: layer {name!r} is called {len(nodes)} times "
                "(a shared layer's filters cannot be removed for one call only)"
            )
        inbound = [item for node in nodes for item in node]
        if any(item[2] != 0 or item[1] != 0 for item in inbound):
            inputs = [layouts[item[0]] for item in inbound]
            for layout in inputs:
                pin(layout)
            layouts[name] = fresh(layer)
            graph.roles[name] = _Role("other")
            continue
        inputs = [layouts[item[0]] for item in inbound]
        single = inputs[0] if len(inputs) == 1 else None
        if cls == "InputLayer":
            layouts[name] = fresh(layer)
            graph.roles[name] = _Role("other")
        elif cls in ("Conv2D", "Dense") and single is not None and config.get("groups", 1) == 1:
            size = int(config["filters"] if cls == "Conv2D" else config["units"])
            space = new_space(size, name in excluded)
            graph.producers[space] = name
            layouts[name] = _Layout([(space, size)])
            graph.roles[name] = _Role("producer", single, space)
        elif single is not None and single.repeat == 1 and _channelwise(cls, config, layer):
            layouts[name] = single
            graph.roles[name] = _Role("channelwise", single)
        elif cls in _PASS and single is not None:
            layouts[name] = single
            graph.roles[name] = _Role("other")
        elif cls == "Flatten" and single is not None and single.repeat == 1:
            positions = int(np.prod(layer.input_shape[1:-1], dtype=np.int64))
            layouts[name] = _Layout(single.segments, positions)
            graph.roles[name] = _Role("other")
        elif cls in _MERGE and _aligned(inputs):
            for layout in inputs[1:]:
                for (a, _), (b, _) in zip(inputs[0].segments, layout.segments, strict=True):
                    union(a, b)
            layouts[name] = inputs[0]
            graph.roles[name] = _Role("other")
        elif cls == "Concatenate" and _on_channels(config, layer) and inputs:
            if all(layout.repeat == 1 for layout in inputs):
                segments = [s for layout in inputs for s in layout.segments]
                layouts[name] = _Layout(segments)
                graph.roles[name] = _Role("other")
            else:
                for layout in inputs:
                    pin(layout)
                layouts[name] = fresh(layer)
                graph.roles[name] = _Role("other")
        else:  # a layer this module cannot slice: it keeps its inputs whole
            for layout in inputs:
                pin(layout)
            layouts[name] = fresh(layer)
            graph.roles[name] = _Role("other")
    for output in model.get_config()["output_layers"]:
        pin(layouts[output[0]])
    graph.finish()
    return graph


def _channelwise(cls: str, config: dict, layer: keras.layers.Layer) -> bool:
    """A layer with one weight slice per input channel that this module can cut."""
    rank = len(layer.input_shape)
    if cls == "BatchNormalization":
        axis = config["axis"]
        axes = axis if isinstance(axis, list) else [axis]
        return [a % rank for a in axes] == [rank - 1]
    return cls == "DepthwiseConv2D" and int(config.get("depth_multiplier", 1)) == 1


def _on_channels(config: dict, layer: keras.layers.Layer) -> bool:
    rank = len(layer.output_shape)
    return int(config.get("axis", -1)) % rank == rank - 1


def _aligned(inputs: list[_Layout]) -> bool:
    """Inputs whose channel spaces line up one to one (same sizes in the same order)."""
    if len(inputs) < 2:
        return False
    shape = [size for _, size in inputs[0].segments], inputs[0].repeat
    return all(([size for _, size in x.segments], x.repeat) == shape for x in inputs[1:])


def l1_scores(graph: FilterGraph) -> dict[str, np.ndarray]:
    """Per group, each channel's L1 norm over the weights it touches in conv, depthwise and
    dense layers: its filters in the members and its input slices in the layers reading it
    (batch-norm parameters left out, as on the torch backend)."""
    scores = {g.name: np.zeros(g.channels) for g in graph.groups}
    for name, role in graph.roles.items():
        layer = graph.model.get_layer(name)
        if role.kind == "producer":
            kernel = np.abs(layer.kernel.numpy())
            group = graph.group_of(role.space)
            if group is not None:
                scores[group] += kernel.reshape(-1, kernel.shape[-1]).sum(0)
            per_input = kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum((0, 2))
            _add_by_input(graph, role.inputs, per_input, scores)
        elif role.kind == "channelwise" and hasattr(layer, "depthwise_kernel"):
            kernel = np.abs(layer.depthwise_kernel.numpy())
            _add_by_input(graph, role.inputs, kernel.sum((0, 1, 3)), scores)
    return scores


def _add_by_input(
    graph: FilterGraph, layout: _Layout, per_input: np.ndarray, scores: dict[str, np.ndarray]
) -> None:
    """Add a layer's per-input-position norms to the groups its input channels belong to."""
    per_channel = per_input.reshape(layout.repeat, layout.channels).sum(0)
    offset = 0
    for space, size in layout.segments:
        group = graph.group_of(space)
        if group is not None:
            scores[group] += per_channel[offset : offset + size]
        offset += size


def shrink(graph: FilterGraph, keep: dict[str, np.ndarray]) -> keras.Model:
    """A new model with only the ``keep`` channels (sorted indices per group name; a group
    not named keeps all), built from the old config and holding the old model's kept weights.

    Build it in the distribution strategy's scope if it is to be trained.
    """
    model = graph.model
    config = copy.deepcopy(model.get_config())
    for entry in config["layers"]:
        role = graph.roles[entry["name"]]
        if role.kind == "producer":
            group = graph.group_of(role.space)
            if group is not None and group in keep:
                key = "filters" if entry["class_name"] == "Conv2D" else "units"
                entry["config"][key] = len(keep[group])
    smaller = keras.Model.from_config(config)
    for layer in model.layers:
        role = graph.roles[layer.name]
        values = layer.get_weights()
        if role.kind == "producer":
            rows = graph.input_index(role.inputs, keep)
            own = graph.input_index(_Layout([(role.space, graph.sizes[role.space])]), keep)
            kernel = np.take(np.take(values[0], rows, axis=-2), own, axis=-1)
            values = [kernel, *(np.take(v, own, axis=-1) for v in values[1:])]
        elif role.kind == "channelwise":
            index = graph.input_index(role.inputs, keep)
            if hasattr(layer, "depthwise_kernel"):
                values = [np.take(values[0], index, axis=2), *(v[index] for v in values[1:])]
            else:
                values = [v[index] for v in values]
        smaller.get_layer(layer.name).set_weights(values)
    return smaller
