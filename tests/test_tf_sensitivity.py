"""TensorFlow sensitivity analysis: each layer group pruned alone (whole filters), the table, the
plot and the ratios that structured_sensitivity prunes with."""

import copy
import csv
import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from tf_fixtures import DATA, TRAIN_CFG

from shrinkflow.backends.base import JobContext
from shrinkflow.backends.tensorflow import sensitivity
from shrinkflow.backends.tensorflow.artifact import KERAS_FILE, load_model
from shrinkflow.backends.tensorflow.filter_groups import filter_graph
from shrinkflow.backends.tensorflow.prune import prune_model
from shrinkflow.errors import ShrinkflowError
from shrinkflow.structured_ratios import RATIOS_FILE, load_ratios

RATIOS = [0.25, 0.75]
CFG = {
    **copy.deepcopy(TRAIN_CFG),
    "prune": {
        "scope": "global",
        # Stage 3 kept whole: 8 groups to sweep rather than 12 (every swept point rebuilds
        # the model, about a second each).
        "exclude": ["output", "layer3_*"],
        "structured": {
            "rounds": 1,
            "round_epochs": 0,
            "layer_ratios": None,
            "max_layer_ratio": 0.9,
        },
    },
    # The digits baseline is fragile to filter removal; a wide budget leaves groups to prune.
    "sensitivity": {"ratios": RATIOS, "max_drop": 0.3},
}
EXCLUDE = CFG["prune"]["exclude"]
STAGE1 = "conv1 layer1_0_conv2 layer1_1_conv2 layer1_2_conv2"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def analysis(tf_digits_baseline, tmp_path_factory) -> tuple[Path, Path, dict, str]:
    """A copy of conftest's trained digits resnet20, and its sensitivity analysis."""
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


def test_every_group_is_swept_at_every_ratio(analysis):
    baseline, out, facts, before = analysis
    assert sorted(p.name for p in out.iterdir()) == [
        "ratios.json",
        "sensitivity.csv",
        "sensitivity.png",
    ]
    assert facts["groups"] == 8
    assert facts["baseline_val_top1"] > 0.8  # trained: the drops below measure something
    rows = read_rows(out)
    assert list(rows[0]) == ["group", "members", "ratio", "val_top1", "drop", "params_removed"]
    groups = [g.name for g in filter_graph(load_model(baseline)[0], EXCLUDE).groups]
    assert [(r["group"], float(r["ratio"])) for r in rows] == [
        (g, r) for g in groups for r in RATIOS
    ]
    for r in rows:
        assert float(r["drop"]) == pytest.approx(facts["baseline_val_top1"] - float(r["val_top1"]))
    assert (out / sensitivity.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert digest(baseline / KERAS_FILE) == before


def test_residual_groups_are_pruned_as_one(analysis):
    _, out, _, _ = analysis
    rows = read_rows(out)
    coupled = {r["group"]: r["members"] for r in rows if len(r["members"].split()) > 1}
    assert set(coupled) == {"conv1", "layer2_0_conv2"}
    assert coupled["conv1"] == STAGE1
    # A singleton group's 24 of 32 filters, their batch-norm scale and shift, and the next
    # conv's input slices.
    removed = {
        float(r["ratio"]): int(r["params_removed"]) for r in rows if r["group"] == "layer2_2_conv1"
    }
    assert removed[0.75] == 3 * 3 * 32 * 24 + 2 * 24 + 3 * 3 * 24 * 32
    # The stem's group at 0.25: 4 filters (+ batch norm) of each member, and their input
    # slices in the three stage-1 blocks' first convs and in stage 2's conv and shortcut.
    stem = next(r for r in rows if r["group"] == "conv1" and float(r["ratio"]) == 0.25)
    members = 3 * 3 * 1 * 4 + 8 + 3 * (3 * 3 * 16 * 4 + 8)
    readers = 3 * (3 * 3 * 4 * 16) + 3 * 3 * 4 * 32 + 1 * 1 * 4 * 32
    assert int(stem["params_removed"]) == members + readers


def test_ratios_are_the_largest_within_max_drop(analysis):
    _, out, _, _ = analysis
    ratios = load_ratios(out)
    rows = read_rows(out)
    assert set(ratios) == {r["group"] for r in rows}
    for group, chosen in ratios.items():
        drops = {float(r["ratio"]): float(r["drop"]) for r in rows if r["group"] == group}
        expected = 0.0
        for ratio in RATIOS:  # the largest ratio up to which no swept ratio costs too much
            if not drops[ratio] <= 0.3 + 1e-9:
                break
            expected = ratio
        assert chosen == expected, group
    assert len(set(ratios.values())) > 1  # the analysis tells groups apart


def test_structured_sensitivity_prunes_with_those_ratios(analysis, tmp_path):
    baseline, out, _, _ = analysis
    ratios = load_ratios(out)
    sparsity = float(np.mean(list(ratios.values())))
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    context = JobContext(pruned, tmp_path / "resume")
    facts = prune_model(CFG, "structured_sensitivity", sparsity, baseline, DATA, context, out)
    assert facts["layer_groups"] == 8
    after = load_model(pruned)[0]
    for group in filter_graph(load_model(baseline)[0], EXCLUDE).groups:
        left = int(after.get_layer(group.name).kernel.shape[-1])
        # At the profile's own mean every group loses its ratio, in whole filters.
        expected = ratios[group.name]
        assert 1 - left / group.channels == pytest.approx(expected, abs=1 / group.channels), group


def test_a_ratio_file_is_required(analysis, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ShrinkflowError, match=f"{RATIOS_FILE}: not found"):
        prune_model(
            CFG,
            "structured_sensitivity",
            0.3,
            analysis[0],
            DATA,
            JobContext(tmp_path / "out", tmp_path),
            tmp_path,
        )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**CFG, "sensitivity": {"ratios": [0.5, 1.0], "max_drop": 0.02}}, r"ratios: 1.0 is not"),
        ({**CFG, "prune": {"exclude": ["layer9_*"]}}, r"prune.exclude: 'layer9_\*' matches no"),
        ({**CFG, "prune": {"exclude": ["*"]}}, "no layer group is left to prune"),
    ],
)
def test_bad_params_are_named(analysis, tmp_path, cfg, message):
    with pytest.raises(ShrinkflowError, match=message):
        sensitivity.analyze_sensitivity(cfg, analysis[0], DATA, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_validation_images_is_an_error(analysis, tmp_path):
    no_val = dataclasses.replace(DATA, val=DATA.val[:0])
    with pytest.raises(ShrinkflowError, match="no validation images"):
        sensitivity.analyze_sensitivity(CFG, analysis[0], no_val, tmp_path)
