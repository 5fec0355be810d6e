"""Sensitivity analysis: each layer group pruned alone, the table, the plot and the ratios that
structured_sensitivity prunes with."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch_prune_fixtures import (
    CLASSES,
    group_ratios,
    groups_of,
    make_cfg,
    one_thread,
    save_baseline,
)
from torch_prune_fixtures import QUADRANTS as DATA
from torch_prune_fixtures import STRUCTURED_CFG as CFG
from torch_prune_fixtures import prune_structured as prune

from shrinkflow.backends.torch import sensitivity
from shrinkflow.backends.torch.artifact import load_model
from shrinkflow.backends.torch.models import create_model
from shrinkflow.backends.torch.train import fit_in_memory
from shrinkflow.errors import ShrinkflowError
from shrinkflow.structured_ratios import RATIOS_FILE, fill_to_mean, load_ratios

RESIDUAL_STAGE_1 = "conv1 layer1.0.conv2 layer1.1.conv2 layer1.2.conv2"


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A resnet20 trained to tell the quadrants apart, and its sensitivity analysis."""
    root = tmp_path_factory.mktemp("sensitivity")
    with one_thread():
        torch.manual_seed(0)
        model = create_model("resnet20", CLASSES, in_channels=1, image_size=8)
        fit_in_memory(model, CFG, DATA, epochs=3, lr=0.05, device="cpu")
        baseline = save_baseline(root / "baseline", model=model)
        out = root / "sensitivity"
        out.mkdir()
        facts = sensitivity.analyze_sensitivity(CFG, baseline, DATA, out)
    return baseline, out, facts


def read_rows(out: Path) -> list[dict]:
    with open(out / sensitivity.CSV_FILE, newline="") as f:
        return list(csv.DictReader(f))


def test_every_group_is_swept_at_every_ratio(analysis):
    _, out, facts = analysis
    assert sorted(p.name for p in out.iterdir()) == [
        "ratios.json",
        "sensitivity.csv",
        "sensitivity.png",
    ]
    assert facts["groups"] == 12
    assert facts["baseline_val_top1"] > 0.8  # trained: the drops below measure something
    rows = read_rows(out)
    assert list(rows[0]) == ["group", "members", "ratio", "val_top1", "drop", "params_removed"]
    assert len(rows) == 12 * 3
    assert {float(r["ratio"]) for r in rows} == {0.25, 0.5, 0.75}
    for r in rows:
        assert float(r["drop"]) == pytest.approx(facts["baseline_val_top1"] - float(r["val_top1"]))
        assert int(r["params_removed"]) > 0
    assert (out / sensitivity.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_residual_groups_are_pruned_as_one_and_are_sensitive(analysis):
    _, out, facts = analysis
    rows = read_rows(out)
    coupled = [r for r in rows if len(r["members"].split()) > 1]
    # The stem and the three stages' residual streams (each with its shortcut projection).
    assert {r["group"] for r in coupled} == {"conv1", "layer2.0.conv2", "layer3.0.conv2"}
    assert next(r for r in coupled if r["group"] == "conv1")["members"] == RESIDUAL_STAGE_1
    assert any(float(r["drop"]) > 0 for r in coupled if float(r["ratio"]) == 0.75)
    # A coupled group loses the same share of filters in every member.
    stem = {float(r["ratio"]): int(r["params_removed"]) for r in coupled if r["group"] == "conv1"}
    assert stem[0.25] < stem[0.5] < stem[0.75]
    assert stem[0.25] > 4 * 9 * (1 + 3 * 16)  # 4 filters of each member, before readers' inputs


def test_ratios_are_the_largest_within_max_drop(analysis):
    _, out, _ = analysis
    max_drop = CFG["sensitivity"]["max_drop"]
    ratios = load_ratios(out)
    rows = read_rows(out)
    assert set(ratios) == {r["group"] for r in rows}
    for name, chosen in ratios.items():
        drops = {float(r["ratio"]): float(r["drop"]) for r in rows if r["group"] == name}
        assert all(drop <= max_drop + 1e-9 for ratio, drop in drops.items() if ratio <= chosen)
        larger = [ratio for ratio in drops if ratio > chosen]
        if larger:
            assert drops[min(larger)] > max_drop
    assert 0.0 < sum(ratios.values()) / len(ratios) < 0.75  # some groups robust, some not


def test_structured_sensitivity_prunes_with_those_ratios(analysis, tmp_path):
    baseline, out, _ = analysis
    ratios = load_ratios(out)
    mean = sum(ratios.values()) / len(ratios)
    _, model, _ = prune(
        tmp_path,
        make_cfg("global"),
        mean,
        "structured_sensitivity",
        baseline=baseline,
        sensitivity_dir=out,
    )
    base = load_model(baseline)[0]
    channels = {n: m.out_channels for n, m in base.named_modules() if hasattr(m, "out_channels")}
    for name, measured in group_ratios(base, model).items():
        assert measured == pytest.approx(ratios[name], abs=1 / channels[name] + 1e-9)


def test_sensitivity_ratios_are_capped_and_the_excess_spread(analysis, tmp_path):
    baseline, _, _ = analysis
    # A robust stem (0.8) among sensitive groups (0.2): scaled to a mean of 0.5 it would lose
    # 0.8 * 0.5 / 0.25 = 1.6 of its filters; it is held at the cap and the rest carry the target.
    names = [g.name for g in groups_of(load_model(baseline)[0])]
    weights = {name: 0.8 if name == "conv1" else 0.2 for name in names}
    ratios = fill_to_mean(weights, 0.5, 0.9, "key")
    assert ratios["conv1"] == pytest.approx(0.9)
    assert sum(ratios.values()) / len(ratios) == pytest.approx(0.5)
    others = {r for name, r in ratios.items() if name != "conv1"}
    assert len(others) == 1 and max(others) < 0.9  # the sensitive groups share the rest equally
    (tmp_path / RATIOS_FILE).write_text(json.dumps(weights))
    facts, _, _ = prune(
        tmp_path,
        make_cfg("global"),
        0.5,
        "structured_sensitivity",
        baseline=baseline,
        sensitivity_dir=tmp_path,
    )
    assert facts["params"] < facts["params_before"]


def test_sensitivity_ratios_that_cannot_reach_the_target_are_refused():
    # two of four groups may be pruned; at most 0.9 each gives a mean of at most 0.45
    with pytest.raises(ShrinkflowError, match=r"key: only 2 of 4 layer groups may be pruned"):
        fill_to_mean({"a": 0.5, "b": 0.25, "c": 0.0, "d": 0.0}, 0.5, 0.9, "key")
    assert fill_to_mean({"a": 0.5, "b": 0.0}, 0.0, 0.9, "key") == {"a": 0.0, "b": 0.0}


def test_ratio_file_of_another_model_is_refused(analysis, tmp_path):
    baseline, _, _ = analysis
    (tmp_path / RATIOS_FILE).write_text(json.dumps({"features.0": 0.5}))
    with pytest.raises(ShrinkflowError, match="no ratio for layer group 'conv1'"):
        prune(
            tmp_path,
            make_cfg("global"),
            0.3,
            "structured_sensitivity",
            baseline=baseline,
            sensitivity_dir=tmp_path,
        )


def test_no_validation_images_is_an_error(analysis, tmp_path):
    baseline, _, _ = analysis
    no_val = dataclasses.replace(DATA, val=DATA.val[:0])
    with pytest.raises(ShrinkflowError, match="no validation images"):
        sensitivity.analyze_sensitivity(CFG, baseline, no_val, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "ratios.json: not found"),
        ("{not json", "ratios.json: unreadable"),
        ('{"conv1": 1.5}', "ratios.json: expected an object of layer group -> ratio"),
        ("[0.5]", "ratios.json: expected an object"),
    ],
)
def test_bad_ratio_files_are_named(tmp_path, content, message):
    if content is not None:
        (tmp_path / RATIOS_FILE).write_text(content)
    with pytest.raises(ShrinkflowError, match=message):
        load_ratios(tmp_path)
