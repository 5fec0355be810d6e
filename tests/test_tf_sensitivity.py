"""TensorFlow sensitivity analysis: each prunable layer pruned alone by magnitude, the table and
the plot."""

import csv
import dataclasses
import hashlib
import shutil
from pathlib import Path

import pytest
from tf_fixtures import DATA

from shrinkflow.backends.tensorflow import sensitivity
from shrinkflow.backends.tensorflow.artifact import KERAS_FILE
from shrinkflow.errors import ShrinkflowError

RATIOS = [0.1, 0.5, 0.9]
CFG = {
    "seed": 0,
    "prune": {"exclude": ["output", "layer2_0_downsample_0"]},
    "sensitivity": {"ratios": RATIOS, "max_drop": 0.02},
}
# resnet20's Conv2D and Dense layers, in model order.
LAYERS = (
    ["conv1"]
    + [f"layer1_{b}_conv{c}" for b in range(3) for c in (1, 2)]
    + ["layer2_0_conv1", "layer2_0_conv2", "layer2_0_downsample_0"]
    + [f"layer2_{b}_conv{c}" for b in (1, 2) for c in (1, 2)]
    + ["layer3_0_conv1", "layer3_0_conv2", "layer3_0_downsample_0"]
    + [f"layer3_{b}_conv{c}" for b in (1, 2) for c in (1, 2)]
    + ["fc"]
)
SWEPT = [n for n in LAYERS if n not in ("fc", "layer2_0_downsample_0")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def analysis(tf_digits_baseline, tmp_path_factory) -> tuple[Path, Path, dict, str]:
    """A resnet20 trained briefly on the 8x8 digits (a copy of conftest's), and its sensitivity
    analysis."""
    root = tmp_path_factory.mktemp("tf_sensitivity")
    baseline = shutil.copytree(tf_digits_baseline[0], root / "baseline")
    before = digest(baseline / KERAS_FILE)
    out = root / "sensitivity"
    out.mkdir()
    facts = sensitivity.analyze_sensitivity(CFG, baseline, DATA, out)
    return baseline, out, facts, before


def read_rows(out: Path) -> list[dict]:
    with open(out / sensitivity.CSV_FILE, newline="") as f:
        return list(csv.DictReader(f))


def drops(rows: list[dict], layer: str) -> dict[float, float]:
    return {float(r["ratio"]): float(r["drop"]) for r in rows if r["group"] == layer}


def test_every_layer_but_the_excluded_is_swept_at_every_ratio(analysis):
    _, out, facts, _ = analysis
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.csv", "sensitivity.png"]
    assert facts["groups"] == len(SWEPT)
    assert facts["baseline_val_top1"] > 0.8  # trained: the drops below measure something
    rows = read_rows(out)
    assert list(rows[0]) == ["group", "members", "ratio", "val_top1", "drop", "params_removed"]
    assert [(r["group"], float(r["ratio"])) for r in rows] == [
        (n, r) for n in SWEPT for r in RATIOS
    ]
    for r in rows:
        assert r["members"] == r["group"]
        assert float(r["drop"]) == pytest.approx(facts["baseline_val_top1"] - float(r["val_top1"]))
    assert (out / sensitivity.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_params_removed_is_the_share_of_the_layers_kernel(analysis):
    _, out, _, _ = analysis
    rows = read_rows(out)
    kernels = {"conv1": 3 * 3 * 1 * 16, "layer3_2_conv2": 3 * 3 * 64 * 64}
    for layer, size in kernels.items():
        removed = {float(r["ratio"]): int(r["params_removed"]) for r in rows if r["group"] == layer}
        assert removed == {ratio: round(ratio * size) for ratio in RATIOS}


def test_pruning_more_of_a_layer_costs_more(analysis):
    _, out, _, _ = analysis
    rows = read_rows(out)
    stem = drops(rows, "conv1")  # 144 weights, the only path from the pixels: the most sensitive
    assert stem[0.9] > stem[0.1] + 0.3
    assert stem[0.9] == max(drops(rows, n)[0.9] for n in SWEPT)
    for name in SWEPT:
        # The smallest weights carry little (pruning may even help a little, by noise).
        assert abs(drops(rows, name)[0.1]) <= 0.02, name
        assert drops(rows, name)[0.9] >= -0.03, name


def test_each_layer_is_scored_against_the_untouched_baseline(analysis, tmp_path):
    baseline, out, facts, before = analysis
    assert digest(baseline / KERAS_FILE) == before
    # The last conv swept alone scores as it did after every other layer's sweep: each pruned
    # kernel was restored before the next layer was pruned.
    last = "layer3_2_conv2"
    others = [n for n in LAYERS if n != last]
    alone = sensitivity.analyze_sensitivity(
        {**CFG, "prune": {"exclude": others}}, baseline, DATA, tmp_path
    )
    assert alone == {"groups": 1, "baseline_val_top1": facts["baseline_val_top1"]}
    assert read_rows(tmp_path) == [r for r in read_rows(out) if r["group"] == last]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**CFG, "sensitivity": {"ratios": [0.5, 1.0], "max_drop": 0.02}}, r"ratios: 1.0 is not"),
        ({**CFG, "prune": {"exclude": ["layer9_*"]}}, r"prune.exclude: 'layer9_\*' matches no"),
        ({**CFG, "prune": {"exclude": ["*"]}}, "excludes every conv and dense layer"),
    ],
)
def test_bad_params_are_named(analysis, tmp_path, cfg, message):
    baseline = analysis[0]
    with pytest.raises(ShrinkflowError, match=message):
        sensitivity.analyze_sensitivity(cfg, baseline, DATA, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_validation_images_is_an_error(analysis, tmp_path):
    no_val = dataclasses.replace(DATA, val=DATA.val[:0])
    with pytest.raises(ShrinkflowError, match="no validation images"):
        sensitivity.analyze_sensitivity(CFG, analysis[0], no_val, tmp_path)
