"""TensorFlow structured (filter) pruning: layer groups found in the Keras graph, a physically
smaller model that still runs, filter choice, scopes, rounds and the limits of the plan."""

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import tf_keras as keras
from tf_fixtures import DATA, TRAIN_CFG, quantize

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import prune_structured as ps
from shrinkflow.backends.tensorflow.artifact import KERAS_FILE, TFLITE_FILE, load_model
from shrinkflow.backends.tensorflow.filter_groups import filter_graph, l1_scores, shrink
from shrinkflow.backends.tensorflow.models import create_model
from shrinkflow.backends.tensorflow.prune import prune_model
from shrinkflow.data.prepared import PreparedData
from shrinkflow.errors import ShrinkflowError

CFG = {
    **copy.deepcopy(TRAIN_CFG),
    "prune": {
        "scope": "global",
        "exclude": ["output"],
        "structured": {
            "rounds": 1,
            "round_epochs": 0,
            "layer_ratios": None,
            "max_layer_ratio": 0.9,
        },
    },
}
STAGE1 = ("conv1", "layer1_0_conv2", "layer1_1_conv2", "layer1_2_conv2")
STAGE2 = ("layer2_0_conv2", "layer2_0_downsample_0", "layer2_1_conv2", "layer2_2_conv2")


def make_cfg(scope: str = "global", **structured) -> dict:
    cfg = copy.deepcopy(CFG)
    cfg["prune"]["scope"] = scope
    cfg["prune"]["structured"].update(structured)
    return cfg


def widths(model: keras.Model) -> dict[str, int]:
    """Each Conv2D/Dense layer's filters (units) as built."""
    layers = (keras.layers.Conv2D, keras.layers.Dense)
    return {la.name: int(la.kernel.shape[-1]) for la in model.layers if isinstance(la, layers)}


def run(
    root: Path,
    cfg: dict,
    sparsity: float,
    baseline: Path,
    method: str = "structured_l1",
    data: PreparedData = DATA,
):
    """``prune_model`` (the stage's entry) into ``root/out``: (facts, model, rounds, folder)."""
    out = root / "out"
    out.mkdir(parents=True)
    rounds = []
    context = JobContext(out, root / "resume", lambda step, m: rounds.append((step, m)))
    facts = prune_model(cfg, method, sparsity, baseline, data, context)
    return facts, load_model(out)[0], rounds, out


@pytest.fixture(scope="module")
def halves(tf_digits_baseline, tmp_path_factory):
    """``scope -> run(...)`` of structured_l1 at 0.5 from the trained digits resnet20."""
    root = tmp_path_factory.mktemp("tf_structured")
    return {s: run(root / s, make_cfg(s), 0.5, tf_digits_baseline[0]) for s in ("global", "layer")}


def test_residual_coupled_convs_form_one_group():
    graph = filter_graph(create_model("resnet20", 10, 1, 8), ["output"])
    groups = {g.name: g for g in graph.groups}
    assert len(groups) == 12
    assert groups["conv1"].members == STAGE1
    assert groups["layer2_0_conv2"].members == STAGE2 and groups["layer2_0_conv2"].channels == 32
    assert groups["layer3_0_conv1"].members == ("layer3_0_conv1",)
    excluded = filter_graph(create_model("resnet20", 10, 1, 8), ["output", "layer2_1_conv2"])
    assert [g.name for g in excluded.groups] == [g for g in groups if g != "layer2_0_conv2"]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_half_the_filters_leave_and_the_model_runs(halves, tf_digits_baseline, scope):
    facts, model, rounds, _ = halves[scope]
    assert 0.2 < facts["params"] / facts["params_before"] < 0.32
    assert 0.2 < facts["macs"] / facts["macs_before"] < 0.32
    assert facts["measured_sparsity"] == pytest.approx(0.75, abs=0.05)
    assert facts["layer_groups"] == 12
    assert rounds == [(1, {k: facts[k] for k in ("params", "macs", "val_top1")} | {"round": 1})]
    assert model(np.zeros((3, 8, 8, 1), np.float32)).shape == (3, 10)
    after = widths(model)
    for coupled in (STAGE1, STAGE2):
        assert len({after[n] for n in coupled}) == 1
    assert after["fc"] == 10 and model.get_layer("fc").kernel.shape[0] == after["layer3_2_conv2"]
    before = widths(load_model(tf_digits_baseline[0])[0])
    if scope == "layer":
        assert after == {n: c if n == "fc" else c // 2 for n, c in before.items()}
    else:  # one ranking: 224 of the groups' 448 filters leave, unevenly
        groups = filter_graph(load_model(tf_digits_baseline[0])[0], ["output"]).groups
        assert sum(after[g.name] for g in groups) == 224
        assert len({after[g.name] / g.channels for g in groups}) > 1


def test_smaller_model_file_and_tflite(halves, tf_digits_baseline, tf_digits_conversions, tmp_path):
    pruned, _, _, folder = halves["layer"]
    baseline = tf_digits_baseline[0]
    keras_share = (folder / KERAS_FILE).stat().st_size / (baseline / KERAS_FILE).stat().st_size
    assert keras_share < 0.4
    assert load_model(folder)[1]["arch"] == "resnet20"  # the spec names the registry model
    tflite, facts = quantize("static_int8", folder, DATA, tmp_path)
    base_tflite = tf_digits_conversions["static_int8"][0]
    share = (tflite / TFLITE_FILE).stat().st_size / (base_tflite / TFLITE_FILE).stat().st_size
    assert share < 0.45
    # The int8 file computes what the smaller Keras model does.
    assert facts["val_top1"] == pytest.approx(pruned["val_top1"], abs=0.05)


def test_l1_keeps_the_largest_filters_and_random_is_seeded(tf_digits_baseline):
    model = load_model(tf_digits_baseline[0])[0]
    graph = filter_graph(model, ["output"])
    scores = l1_scores(graph)
    conv1, conv2 = model.get_layer("layer1_0_conv1"), model.get_layer("layer1_0_conv2")
    norms = np.abs(conv1.kernel.numpy()).sum((0, 1, 2)) + np.abs(conv2.kernel.numpy()).sum(
        (0, 1, 3)
    )
    np.testing.assert_allclose(scores["layer1_0_conv1"], norms, rtol=1e-5)
    initial = {g.name: g.channels for g in graph.groups}
    ratios = dict.fromkeys(initial, 0.5)
    kept, _ = ps.choose_kept(graph, scores, ratios, 0.5, initial, 1.0, 0.9)
    assert set(kept["layer1_0_conv1"]) == set(np.argsort(-norms)[:8])

    def random_kept(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        chosen = ps.channel_scores(graph, "structured_random", rng)
        return ps.choose_kept(graph, chosen, ratios, 0.5, initial, 1.0, 0.9)[0]

    first, again, other = random_kept(0), random_kept(0), random_kept(1)
    assert all(np.array_equal(first[n], again[n]) for n in initial)
    assert {n: len(k) for n, k in first.items()} == {n: len(k) for n, k in kept.items()}
    assert any(not np.array_equal(first[n], kept[n]) for n in initial)
    assert any(not np.array_equal(first[n], other[n]) for n in initial)


def test_global_ranking_never_takes_more_than_max_layer_ratio(tf_digits_baseline):
    model = load_model(tf_digits_baseline[0])[0]
    # 30 of layer2_1_conv1's 32 filters carry almost nothing: a plain ranking takes them all.
    for name, axis in (("layer2_1_conv1", -1), ("layer2_1_conv2", -2)):
        kernel = model.get_layer(name).kernel
        scale = np.ones(32, np.float32)
        scale[:30] = 1e-6
        kernel.assign(kernel.numpy() * np.expand_dims(scale, tuple(range(axis + 1, 0))))
    graph = filter_graph(model, ["output"])
    initial = {g.name: g.channels for g in graph.groups}
    keep, held = ps.choose_kept(graph, l1_scores(graph), None, 0.5, initial, 1.0, 0.9)
    assert len(keep["layer2_1_conv1"]) == 32 - 28  # floor(0.9 * 32) removed, no more
    assert held == 1
    # The filters it was denied went to no other group: the global target falls short.
    assert sum(initial[n] - len(k) for n, k in keep.items()) < 224


def test_rounds_recover_in_between_and_reach_the_same_widths(halves, tf_digits_baseline, tmp_path):
    calls = []
    real = ps.recover

    def spy(model, cfg, data, epochs):
        calls.append(epochs)
        return real(model, cfg, data, epochs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ps, "recover", spy)
        cfg = make_cfg("layer", rounds=2, round_epochs=1)
        few = dataclasses.replace(DATA, train=DATA.train[:64])  # two steps of recovery
        facts, model, rounds, _ = run(tmp_path, cfg, 0.5, tf_digits_baseline[0], data=few)
    assert calls == [1]
    assert [step for step, _ in rounds] == [1, 2]
    assert rounds[0][1]["params"] > rounds[1][1]["params"] == facts["params"]
    assert widths(model) == widths(halves["layer"][1])


@pytest.mark.parametrize(
    ("scope", "structured", "sparsity", "message"),
    [
        ("layer", {}, 0.95, r"prune.sparsities: 0.95 is above .*max_layer_ratio 0.9"),
        ("global", {"layer_ratios": [0.1] * 13}, 0.1, r"layer_ratios .*13 ratios for 12 "),
        ("global", {"rounds": 0}, 0.5, r"prune.structured.rounds: 0 is not >= 1"),
    ],
)
def test_impossible_plans_are_refused_before_writing(
    tf_digits_baseline, tmp_path, scope, structured, sparsity, message
):
    with pytest.raises(ShrinkflowError, match=message):
        run(tmp_path, make_cfg(scope, **structured), sparsity, tf_digits_baseline[0])
    assert list((tmp_path / "out").iterdir()) == []


def small_functional_model() -> keras.Model:
    """Concatenated branches, a residual sum, a depthwise conv, Flatten and a hidden Dense
    layer; biases instead of batch norms, so a removed channel is exactly a zeroed one."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    x = keras.Input((8, 8, 1), name="pixels")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="a")(x)
    b = layers.Conv2D(6, 3, padding="same", activation="relu", name="b")(x)
    joined = layers.Concatenate(name="join")([a, b])
    c = layers.Conv2D(5, 3, padding="same", name="c")(joined)
    d = layers.Conv2D(5, 1, name="d")(joined)
    summed = layers.ReLU(name="relu")(layers.Add(name="add")([c, d]))
    deep = layers.DepthwiseConv2D(3, padding="same", name="dw")(summed)
    pooled = layers.MaxPooling2D(2, name="pool")(layers.ReLU(name="relu2")(deep))
    hidden = layers.Dense(7, activation="relu", name="hidden")(layers.Flatten(name="flat")(pooled))
    return keras.Model(x, layers.Dense(3, name="fc")(hidden), name="user")


def test_a_user_model_shrinks_to_the_kept_channels():
    model = small_functional_model()
    graph = filter_graph(model, ["output"])
    assert [(g.name, g.members) for g in graph.groups] == [
        ("a", ("a",)),
        ("b", ("b",)),
        ("c", ("c", "d")),
        ("hidden", ("hidden",)),
    ]
    keep = {"a": np.array([0, 2]), "b": np.array([1, 4, 5]), "c": np.array([1, 3]), "hidden": [6]}
    smaller = shrink(graph, keep)
    assert widths(smaller) == {"a": 2, "b": 3, "c": 2, "d": 2, "hidden": 1, "fc": 3}
    # The same function as the full model with the removed filters zeroed (weights and bias).
    dropped = {"a": [1, 3], "b": [0, 2, 3], "c": [0, 2, 4], "d": [0, 2, 4], "hidden": range(6)}
    for name, channels in dropped.items():
        kernel, bias = model.get_layer(name).get_weights()
        kernel[..., list(channels)], bias[list(channels)] = 0, 0
        model.get_layer(name).set_weights([kernel, bias])
    x = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(smaller(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_unknown_layers_keep_their_inputs_whole():
    x = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(4, 3, name="a")(x)
    b = keras.layers.Conv2D(4, 3, name="b")(keras.layers.Reshape((6, 6, 4))(a))
    flat = keras.layers.GlobalAveragePooling2D()(b)
    graph = filter_graph(keras.Model(x, keras.layers.Dense(2, name="fc")(flat)), ["output"])
    assert [g.name for g in graph.groups] == ["b"]


def test_resnet20_shrinks_to_the_function_of_its_silenced_channels(tf_digits_baseline):
    model = load_model(tf_digits_baseline[0])[0]
    graph = filter_graph(model, ["output"])
    initial = {g.name: g.channels for g in graph.groups}
    keep, _ = ps.choose_kept(graph, l1_scores(graph), None, 0.5, initial, 1.0, 0.9)
    smaller = shrink(graph, keep)
    # A removed channel's batch norm set to output 0 silences it: ReLUs and residual sums
    # keep it 0, so the next layers never see it, as if it were gone.
    for group in graph.groups:
        dropped = np.setdiff1d(np.arange(group.channels), keep[group.name])
        for member in group.members:
            bn = model.get_layer(
                member.replace("conv", "bn").replace("downsample_0", "downsample_1")
            )
            gamma, beta, mean, var = bn.get_weights()
            gamma[dropped], beta[dropped] = 0, 0
            bn.set_weights([gamma, beta, mean, var])
    x = DATA.images[DATA.val[:16]].astype(np.float32)
    np.testing.assert_allclose(smaller(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_a_shared_layer_is_refused_by_name():
    x = keras.Input((8, 8, 1))
    shared = keras.layers.Conv2D(1, 3, padding="same", name="twice")
    y = keras.layers.GlobalAveragePooling2D()(shared(shared(x)))
    model = keras.Model(x, keras.layers.Dense(2, name="fc")(y))
    with pytest.raises(ShrinkflowError, match="layer 'twice' is called 2 times"):
        filter_graph(model, ["output"])


@pytest.mark.parametrize(
    ("node", "reshaped", "safe"),
    [
        ({"backend": "tensorflow", "model": "resnet20", "prune_method": "structured_l1"}, 0, 1),
        ({"backend": "tensorflow", "model": "resnet20", "prune_method": "l1_unstructured"}, 0, 0),
        ({"backend": "tensorflow", "model": "resnet20"}, True, 1),  # pruned and trained in rounds
        ({"backend": "tensorflow", "model": "tiny_cnn"}, False, 1),  # a custom model's widths
        ({"backend": "torch", "model": "resnet20", "prune_method": "structured_l1"}, 0, 0),
    ],
)
def test_training_irregular_widths_falls_back_from_onednn(monkeypatch, node, reshaped, safe):
    """TF 2.21's oneDNN kernels abort training a ResNet-20 pruned to 5-21 filters per layer
    (heap corruption, measured in `make run`): such jobs train on Eigen's kernels."""
    from shrinkflow.backends.base import ONEDNN_ENV, use_safe_training_kernels

    monkeypatch.delenv(ONEDNN_ENV, raising=False)
    use_safe_training_kernels(node, reshaped=bool(reshaped))
    assert os.environ.get(ONEDNN_ENV) == ("0" if safe else None)
    monkeypatch.setenv(ONEDNN_ENV, "1")  # the user's choice is kept
    use_safe_training_kernels(node, reshaped=bool(reshaped))
    assert os.environ[ONEDNN_ENV] == "1"
