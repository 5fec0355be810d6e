"""Structured (filter) pruning with Torch-Pruning: smaller models that still run, ratio plans,
filter choice, rounds, and the pruned model file."""

import numpy as np
import pytest
import torch
from torch import nn
from torch_prune_fixtures import (  # noqa: F401 (fixed_threads: an autouse fixture)
    CLASSES,
    fixed_threads,
    group_ratios,
    groups_of,
    make_cfg,
    out_channels,
    save_baseline,
)
from torch_prune_fixtures import QUADRANTS as DATA
from torch_prune_fixtures import STRUCTURED_CFG as CFG
from torch_prune_fixtures import prune_structured as prune

from shrinkflow.backends.torch import prune_structured as ps
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model, save_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.errors import ShrinkflowError
from shrinkflow.training import model_spec

STUDY2_PROFILE = [0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3]


def baseline_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", CLASSES, in_channels=1, image_size=8).eval()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_l1_at_half_shrinks_resnet20_and_keeps_it_runnable(tmp_path, scope):
    facts, model, rounds = prune(tmp_path, make_cfg(scope), 0.5)

    # Half the filters of (nearly) every layer: about a quarter of the weights and MACs remain.
    assert 0.2 < facts["params"] / facts["params_before"] < 0.32
    assert 0.2 < facts["macs"] / facts["macs_before"] < 0.32
    assert facts["measured_sparsity"] == pytest.approx(0.75, abs=0.05)
    assert facts["layer_groups"] == 12
    assert rounds == [(1, {k: facts[k] for k in ("params", "macs", "val_top1")} | {"round": 1})]

    # The file's model runs, keeps the image channels and the classes, and every residual sum
    # still adds tensors of one width (the forward pass would fail otherwise).
    assert model.conv1.in_channels == 1
    assert model.fc.out_features == CLASSES
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, CLASSES)
    widths = out_channels(model)
    for stage, coupled in (
        ("layer1", ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]),
        ("layer3", ["layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"]),
    ):
        assert len({widths[n] for n in coupled}) == 1, stage
    assert model.fc.in_features == widths["layer3.2.conv2"]
    if scope == "layer":
        expected = {n: c // 2 for n, c in out_channels(baseline_model()).items() if n != "fc"}
        assert {n: c for n, c in widths.items() if n != "fc"} == expected


def test_vgg16_without_residuals_loses_half_of_every_layer(tmp_path):
    baseline = save_baseline(tmp_path / "vgg", "vgg16")
    facts, model, _ = prune(tmp_path, make_cfg("layer"), 0.5, baseline=baseline)
    before = out_channels(load_model(baseline)[0])
    after = out_channels(model)
    assert all(after[n] == before[n] // 2 for n in before if n != "classifier")
    assert model.features[0].in_channels == 1
    assert model.classifier.in_features == 256
    assert model.classifier.out_features == CLASSES
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, CLASSES)
    assert facts["params"] / facts["params_before"] == pytest.approx(0.25, abs=0.01)


def test_pruned_model_file_round_trips_and_is_smaller(tmp_path):
    model = baseline_model()
    base_dir = save_baseline(tmp_path / "baseline", model=model)
    example = torch.zeros(1, 1, 8, 8)
    ignored = ps.ignored_layers(model, ["output"])
    pruner = ps.build_pruner(
        model, example, ps.importance("structured_l1", 0), None, 0.5, ignored, 1, 0.9
    )
    ps.prune_step(pruner, 0.9)
    pruned_dir = tmp_path / "pruned"
    pruned_dir.mkdir()
    save_model(model, model_spec("resnet20", DATA), pruned_dir)

    loaded, spec = load_model(pruned_dir)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert out_channels(loaded) == out_channels(model)
    assert spec["arch"] == "resnet20"
    # Only tensors and plain values: it opens with weights_only=True, and holds each weight once.
    payload = torch.load(pruned_dir / MODEL_FILE, weights_only=True)
    assert set(payload) == {"format", "spec", "state_dict"}
    assert all(isinstance(t, torch.Tensor) for t in payload["state_dict"].values())
    size = (pruned_dir / MODEL_FILE).stat().st_size
    assert size < 0.4 * (base_dir / MODEL_FILE).stat().st_size


def test_pruned_shapes_that_do_not_chain_are_refused(tmp_path):
    folder = save_baseline(tmp_path / "baseline")
    payload = torch.load(folder / MODEL_FILE, weights_only=True)
    # One conv loses filters that the layers reading it still expect.
    payload["state_dict"]["layer1.0.conv1.weight"] = torch.zeros(8, 16, 3, 3)
    torch.save(payload, folder / MODEL_FILE)
    with pytest.raises(ShrinkflowError, match="weights do not fit resnet20"):
        load_model(folder)


def test_study2_profile_is_used_as_written_at_its_mean(tmp_path):
    cfg = make_cfg("global", layer_ratios=STUDY2_PROFILE)
    facts, model, _ = prune(tmp_path, cfg, float(np.mean(STUDY2_PROFILE)))
    measured = group_ratios(baseline_model(), model)
    # resnet20's 12 groups in forward order fall into chunks of 2, 2, 2, 2, 1, 1, 1, 1.
    chunks = np.array_split(np.arange(12), len(STUDY2_PROFILE))
    expected = [STUDY2_PROFILE[i] for i, chunk in enumerate(chunks) for _ in chunk]
    for group, ratio in zip(groups_of(baseline_model()), expected, strict=True):
        # Whole filters only: within one filter of the exact share.
        assert measured[group.name] == pytest.approx(ratio, abs=1 / group.channels + 1e-9)
    assert 0 < facts["measured_sparsity"] < 0.5


def test_profile_scaling_follows_the_sparsity():
    groups = [ps.LayerGroup(f"g{i}", (f"g{i}",), 16) for i in range(4)]
    cfg = make_cfg("global", layer_ratios=[0.1, 0.3])
    assert ps.plan_ratios(cfg, "structured_l1", 0.4, groups, None) == pytest.approx(
        {"g0": 0.2, "g1": 0.2, "g2": 0.6, "g3": 0.6}
    )
    assert ps.plan_ratios(make_cfg("global"), "structured_l1", 0.4, groups, None) is None
    assert ps.plan_ratios(make_cfg("layer"), "structured_l1", 0.4, groups, None) == {
        f"g{i}": 0.4 for i in range(4)
    }


@pytest.mark.parametrize(
    ("scope", "structured", "sparsity", "message"),
    [
        (
            "global",
            {"layer_ratios": [0.1, 0.9]},
            0.5,
            r"prune.structured.layer_ratios .*"
            r"layer 'layer2.1.conv1' would lose 0.90 of its filters .*max_layer_ratio 0.8\)",
        ),
        ("layer", {}, 0.85, r"prune.sparsities: 0.85 is above .*max_layer_ratio 0.8"),
        ("global", {"layer_ratios": [0.1] * 13}, 0.1, r"layer_ratios .*13 ratios for 12 "),
        ("global", {"layer_ratios": [0.0, 0.0]}, 0.3, r"layer_ratios .*every ratio is 0"),
    ],
)
def test_impossible_ratios_are_refused_before_anything_is_written(
    tmp_path, scope, structured, sparsity, message
):
    cfg = make_cfg(scope, max_layer_ratio=0.8, **structured)
    with pytest.raises(ShrinkflowError, match=message):
        prune(tmp_path, cfg, sparsity)
    assert list((tmp_path / f"out-structured_l1-{sparsity}").iterdir()) == []


def test_an_unknown_exclude_pattern_is_refused(tmp_path):
    cfg = make_cfg("layer")
    cfg["prune"]["exclude"] = ["output", "layer9.*"]
    with pytest.raises(ShrinkflowError, match="prune.exclude: 'layer9.*' matches no"):
        prune(tmp_path, cfg, 0.5)


def test_excluding_one_member_keeps_its_whole_residual_group(tmp_path):
    cfg = make_cfg("layer")
    cfg["prune"]["exclude"] = ["output", "layer2.1.conv2"]
    facts, model, _ = prune(tmp_path, cfg, 0.5)
    widths = out_channels(model)
    assert facts["layer_groups"] == 11
    for name in ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2"):
        assert widths[name] == 32
    assert widths["layer2.1.conv1"] == 16


def test_global_ranking_never_takes_more_than_max_layer_ratio(tmp_path):
    model = baseline_model()
    # 30 of layer2.1.conv1's 32 channels carry almost nothing, so a global ranking would take
    # all 30 (0.94 of the layer) at once.
    with torch.no_grad():
        model.layer2[1].conv1.weight[:30] *= 1e-6
        model.layer2[1].conv2.weight[:, :30] *= 1e-6
    baseline = save_baseline(tmp_path / "baseline", model=model)
    _, pruned, _ = prune(tmp_path, make_cfg("global", max_layer_ratio=0.9), 0.5, baseline=baseline)
    assert pruned.layer2[1].conv1.out_channels == 32 - 28  # floor(0.9 * 32) removed, no more
    assert pruned(torch.zeros(1, 1, 8, 8)).shape == (1, CLASSES)


def test_random_and_l1_choose_different_filters_in_the_same_numbers(tmp_path):
    model = baseline_model()
    # Distinct batch-norm shifts tag layer1.0.conv1's channels (they play no part in the score),
    # so the pruned model shows which channels were kept.
    with torch.no_grad():
        model.layer1[0].bn1.bias.copy_(torch.arange(16.0))
    baseline = save_baseline(tmp_path / "baseline", model=model)
    cfg = make_cfg("layer")
    _, l1, _ = prune(tmp_path / "l1", cfg, 0.5, baseline=baseline)
    _, random_a, _ = prune(tmp_path / "a", cfg, 0.5, "structured_random", baseline=baseline)
    _, random_b, _ = prune(tmp_path / "b", cfg, 0.5, "structured_random", baseline=baseline)

    def kept(m: nn.Module) -> set[int]:
        return {int(b) for b in m.layer1[0].bn1.bias}

    # L1 keeps the 8 channels whose weights (their filters in layer1.0.conv1 and their input
    # slices in layer1.0.conv2) have the largest L1 norm.
    block = model.layer1[0]
    norms = block.conv1.weight.abs().sum((1, 2, 3)) + block.conv2.weight.abs().sum((0, 2, 3))
    assert kept(l1) == set(norms.argsort(descending=True)[:8].tolist())
    assert out_channels(l1) == out_channels(random_a)
    assert kept(random_a) != kept(l1)
    # Seeded: the same seed chooses the same filters.
    for a, b in zip(random_a.state_dict().values(), random_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_two_rounds_without_recovery_end_where_one_round_does(tmp_path, scope):
    _, one, _ = prune(tmp_path / "one", make_cfg(scope), 0.5)
    _, two, two_rounds = prune(tmp_path / "two", make_cfg(scope, rounds=2), 0.5)
    assert [step for step, _ in two_rounds] == [1, 2]
    assert two_rounds[0][1]["params"] > two_rounds[1][1]["params"]
    if scope == "layer":
        assert out_channels(two) == out_channels(one)
    else:
        # Each round ranks the remaining filters anew, so the split between groups may
        # differ; the total of filters removed may not.
        groups = groups_of(baseline_model())
        assert sum(g.channels for g in groups) == 448
        for model in (one, two):
            assert sum(out_channels(model)[g.name] for g in groups) == 224


def test_rounds_fine_tune_between_rounds_only(tmp_path, monkeypatch):
    calls = []
    real = ps.fit_in_memory

    def spy(model, cfg, data, **kw):
        calls.append(kw)
        return real(model, cfg, data, **kw)

    monkeypatch.setattr(ps, "fit_in_memory", spy)
    cfg = make_cfg("layer", rounds=3, round_epochs=1)
    facts, model, rounds = prune(tmp_path, cfg, 0.5)
    assert [c["epochs"] for c in calls] == [1, 1]
    assert all(c["lr"] == CFG["finetune"]["lr"] for c in calls)
    assert [step for step, _ in rounds] == [1, 2, 3]
    assert out_channels(model)["layer3.1.conv1"] == 32
    assert facts["params"] == rounds[-1][1]["params"]
