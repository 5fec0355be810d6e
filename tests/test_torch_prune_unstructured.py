"""One-shot unstructured magnitude pruning (PyTorch), and the sparse encoding of its files."""

import gzip

import pytest
import torch
from torch import nn
from torch_prune_fixtures import (  # noqa: F401 (fixed_threads: an autouse fixture)
    PRUNE_CFG,
    conv_linear_weights,
    fixed_threads,
    saved_weights,
    with_prune,
)

from shrinkflow import sparse_format
from shrinkflow.backends.base import JobContext
from shrinkflow.backends.torch.artifact import MODEL_FILE, load_model
from shrinkflow.backends.torch.evaluate import evaluate_model
from shrinkflow.backends.torch.prune import prune_model
from shrinkflow.backends.torch.prune_unstructured import (
    apply_masks,
    magnitude_masks,
    masks_from_zeros,
    prunable_modules,
)
from shrinkflow.backends.torch.stored_weights import stored_weights
from shrinkflow.backends.torch.tensors import to_device_tensors
from shrinkflow.errors import ShrinkflowError


@pytest.fixture(scope="module")
def baseline(torch_digits_baseline):
    """conftest's trained resnet20 and its data (read only)."""
    return torch_digits_baseline


def fresh(baseline) -> nn.Module:
    return load_model(baseline[0])[0]


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    return {
        n: 1.0 - int(torch.count_nonzero(m.weight)) / m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def prune(baseline, tmp_path, method="l1_unstructured", sparsity=0.7, cfg=PRUNE_CFG):
    out = tmp_path / "out"
    out.mkdir()
    facts = prune_model(
        cfg, method, sparsity, baseline[0], baseline[1], JobContext(out, tmp_path / "r"), None
    )
    return out, facts


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_scope_reaches_the_target_and_removes_the_smallest_weights(baseline, scope):
    model = fresh(baseline)
    before = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")
    }
    masks = magnitude_masks(model, 0.7, scope, ["output"])
    apply_masks(model, masks)
    assert "fc" not in masks and torch.equal(model.fc.weight, before["fc"])
    assert all(k.dtype == torch.bool for k in masks.values())
    layers = dict(model.named_modules())
    total = sum(k.numel() for k in masks.values())
    zeros = sum(int((layers[n].weight == 0).sum()) for n in masks)
    if scope == "global":
        assert zeros == round(0.7 * total)  # torch's rounding of sparsity x count
        # One ranking over all layers: every pruned |w| is at most every kept |w|.
        pruned = torch.cat([before[n][~k] for n, k in masks.items()]).abs()
        kept = torch.cat([before[n][k] for n, k in masks.items()]).abs()
        assert pruned.max() <= kept.min()
    else:
        for name, keep in masks.items():
            assert int((~keep).sum()) == round(0.7 * keep.numel()), name
            assert before[name][~keep].abs().max() <= before[name][keep].abs().min(), name
    for name, keep in masks.items():
        assert torch.equal(layers[name].weight, before[name] * keep), name


def test_global_and_layer_scope_distribute_sparsity_differently(baseline):
    per_layer = {}
    for scope in ("global", "layer"):
        model = fresh(baseline)
        apply_masks(model, magnitude_masks(model, 0.7, scope, ["output"]))
        per_layer[scope] = layer_sparsity(model)
    layer = [s for n, s in per_layer["layer"].items() if n != "fc"]
    glob = [s for n, s in per_layer["global"].items() if n != "fc"]
    assert max(layer) - min(layer) < 0.01  # every layer at the target, up to rounding
    assert max(glob) - min(glob) > 0.2  # measured: the 1x1 shortcuts and the stem keep more
    assert per_layer["global"]["fc"] == per_layer["layer"]["fc"] == 0.0


def test_exclude_patterns_protect_matching_layers(baseline):
    model = fresh(baseline)
    protected = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if n.startswith("layer1.") and isinstance(m, nn.Conv2d)
    }
    assert len(protected) == 6
    names = [n for n, _ in prunable_modules(model, ["output", "layer1.*"])]
    assert "fc" not in names and not any(n.startswith("layer1.") for n in names)
    assert "conv1" in names and "layer3.0.downsample.0" in names
    apply_masks(model, magnitude_masks(model, 0.9, "layer", ["output", "layer1.*"]))
    layers = dict(model.named_modules())
    for name, weight in protected.items():
        assert torch.equal(layers[name].weight, weight), name
    assert layer_sparsity(model)["layer2.0.conv1"] == pytest.approx(0.9, abs=0.01)
    # Without exclusions the output layer is pruned too.
    assert "fc" in [n for n, _ in prunable_modules(model, [])]


def test_exclude_pattern_that_matches_nothing_is_named(baseline):
    model = fresh(baseline)
    with pytest.raises(ShrinkflowError) as error:
        prunable_modules(model, ["output", "layer9*"])
    message = str(error.value)
    assert message.startswith("prune.exclude: 'layer9*' matches no conv or linear layer")
    assert "conv1, layer1.0.conv1" in message and "more)" in message and "\n" not in message
    # A container's name is not a layer: its children are matched with "layer1.*".
    with pytest.raises(ShrinkflowError, match="'layer1' matches no conv"):
        prunable_modules(model, ["layer1"])


def test_masks_from_zeros_recovers_the_pattern(baseline):
    model = fresh(baseline)
    masks = magnitude_masks(model, 0.5, "global", ["output"])
    apply_masks(model, masks)
    recovered = masks_from_zeros(model, ["output"])
    assert recovered.keys() == masks.keys()
    assert all(torch.equal(recovered[n], masks[n]) for n in masks)


def test_one_shot_saves_plain_weights_at_the_target(baseline, tmp_path):
    out, facts = prune(baseline, tmp_path)
    state = saved_weights(out)
    assert state.keys() == saved_weights(baseline[0]).keys()
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    weights = {k: v for k, v in conv_linear_weights(out).items() if k != "fc.weight"}
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert facts["measured_sparsity"] == zeros / total == pytest.approx(0.7, abs=1 / total)
    model, _ = load_model(out)
    params = list(model.parameters())
    assert facts["params"] == sum(p.numel() for p in params)
    assert facts["nonzero_params"] == sum(int(torch.count_nonzero(p)) for p in params)
    assert facts["nonzero_params"] <= facts["params"] - zeros
    # val_top1 is the saved model's, and one-shot pruning at 70 % costs accuracy (measured:
    # 0.82 -> 0.33 on these digits).
    x, y = to_device_tensors(baseline[1], "val", "cpu")
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() == pytest.approx(facts["val_top1"])
    base, _ = load_model(baseline[0])
    with torch.no_grad():
        assert facts["val_top1"] < (base(x).argmax(1) == y).float().mean().item()


def test_layer_scope_is_read_from_params(baseline, tmp_path):
    out, facts = prune(baseline, tmp_path, cfg=with_prune(scope="layer"))
    weights = conv_linear_weights(out)
    for key in ("conv1.weight", "layer3.1.conv2.weight"):
        assert (weights[key] == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert facts["measured_sparsity"] == pytest.approx(0.7, abs=1e-4)


def test_zero_sparsity_keeps_the_weights(baseline, tmp_path):
    out, facts = prune(baseline, tmp_path, sparsity=0.0)
    before = saved_weights(baseline[0])
    assert all(torch.equal(v, before[k]) for k, v in saved_weights(out).items())
    assert facts["measured_sparsity"] == 0.0


@pytest.mark.parametrize(
    ("method", "sparsity", "cfg", "message"),
    [
        ("l1_unstructured", 1.0, PRUNE_CFG, r"^prune.sparsities: 1.0 is not in \[0, 1\)$"),
        ("l1_unstructured", -0.1, PRUNE_CFG, r"^prune.sparsities: -0.1 is not in \[0, 1\)$"),
        (
            "l2_unstructured",
            0.5,
            PRUNE_CFG,
            r"^prune.methods: 'l2_unstructured' is not available for backend torch",
        ),
        ("l1_unstructured", 0.5, with_prune(exclude=["fc2"]), r"^prune.exclude: 'fc2' matches"),
        ("gradual_polynomial", 0.5, with_prune(exclude=["x*"]), r"^prune.exclude: 'x\*' matches"),
        ("l1_unstructured", 0.5, with_prune(scope="block"), r"^prune.scope: 'block' is not one"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    baseline, tmp_path, method, sparsity, cfg, message
):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShrinkflowError, match=message) as error:
        prune_model(
            cfg,
            method,
            sparsity,
            baseline[0],
            baseline[1],
            JobContext(out, tmp_path / "r"),
            None,
        )
    assert "\n" not in str(error.value)
    assert list(out.iterdir()) == [] and not (tmp_path / "r").exists()


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_sparse_encoding_round_trips_and_shows_what_sparsity_buys(baseline, tmp_path, sparsity):
    out, _ = prune(baseline, tmp_path, sparsity=sparsity)
    state = saved_weights(out)
    tensors, _ = stored_weights(out)
    size, size_gzip = sparse_format.sizes(tensors)
    archive = sparse_format.encode(tensors)
    assert size == len(archive)
    assert size_gzip == len(gzip.compress(archive, 9, mtime=0))
    decoded = sparse_format.save(tmp_path / "model.sparse.npz", tensors)
    decoded = {k: torch.from_numpy(t.dequantize()) for k, t in sparse_format.load(decoded).items()}
    assert decoded.keys() == state.keys()
    assert all(torch.equal(decoded[k], v) and decoded[k].dtype == v.dtype for k, v in state.items())

    dense = (out / MODEL_FILE).stat().st_size
    if sparsity == 0.0:
        # Nothing to skip: the bitmask (1 bit per weight) only adds to the dense bytes.
        assert size > 0.99 * dense
        assert size_gzip > 0.9 * dense  # trained float32 weights barely compress
    else:
        # 10 % of the values, the 1/32 bitmask and the index: measured 0.15 of the dense file.
        assert size < 0.2 * dense
        assert size_gzip < size


def test_evaluate_reports_the_sparse_sizes(baseline, tmp_path):
    out, _ = prune(baseline, tmp_path, sparsity=0.9)
    cfg = {"evaluate": {"device": "cpu", "batch_sizes": [1, 4], "warmup": 1, "repeats": 1}}
    result = evaluate_model(cfg, out, baseline[1])
    tensors = {
        k: sparse_format.StoredTensor(v.numpy(), sparse_format.is_weight(v.numpy()))
        for k, v in load_model(out)[0].state_dict().items()
    }
    expected = sparse_format.sizes(tensors)
    assert (result["sparse_bytes"], result["sparse_gzip_bytes"]) == expected
    # Each non-zero value at its width (float32 weights, int64 batch counters), the zeros free.
    state = load_model(out)[0].state_dict().values()
    nominal = sum(int(torch.count_nonzero(v)) * v.element_size() for v in state)
    assert result["nominal_bytes"] == nominal
    # Measured at 90 %: dense 1.1 MB, its gzip 158 kB (gzip squeezes the zero runs well),
    # sparse 168 kB, sparse + gzip 131 kB: only the last beats gzip of the dense file.
    assert result["nominal_bytes"] < result["sparse_bytes"] < 0.2 * result["size_bytes"]
    assert result["sparse_gzip_bytes"] < result["gzip_bytes"] < result["size_bytes"]
